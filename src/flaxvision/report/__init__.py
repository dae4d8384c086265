"""Run reports: PNG plots in the run directory, gathered in a self-contained report.html.

    flaxvision.report.write_report("runs/x", model=model, train_data=train, val_data=val, stage=stage,
                                   schedule=schedule)     # what fit passes; `flaxvision report` rebuilds them

The HTML embeds every picture (data: URIs), so it opens in a browser with no network and survives being copied.
The report reads the run directory and draws; it builds nothing itself (the `report` command rebuilds the model,
the loaders and the device stage from the run's recipe with flaxvision.train.recipe), so the training samples it
shows went through the same device stage, colour jitter included, as the model's inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision import files
from flaxvision.errors import FlaxvisionError
from flaxvision.report import analysis, page, plots

PLOTS = {
    "lr_schedule.png": "Learning-rate schedule",
    "train_loss.png": "Training loss per step",
    "val_curves.png": "Validation loss and accuracy per epoch",
    "train_samples.png": "Training samples after augmentation",
    "val_samples.png": "Validation samples",
    "predictions.png": "Predictions on validation images",
    "confusion_matrix.png": "Confusion matrix",
    "reliability.png": "Reliability diagram: accuracy against confidence on the validation data",
    "mistakes.png": "The most confident mistakes on the validation data",
    "explanations.png": "Where the model looked",  # the method is named in the caption the report writes
}
PER_CLASS_ROWS = 60  # more classes: the report lists the lowest-F1 ones
EXPLAINED_BY = {"rollout": "attention rollout (Abnar & Zuidema 2020)", "gradcam": "Grad-CAM (Selvaraju et al. 2017)"}


# The fields the pages draw from each kind of record: a record without one is named, not a KeyError.
DRAWN = {"train": ("step", "loss"), "eval": ("step", "val_loss", "val_accuracy")}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, each checked for the fields the report and the compare page draw, so
    that a hand-edited or foreign file is one line naming the record and the field."""
    try:
        lines = files.read_lines(path)
    except (OSError, UnicodeDecodeError) as err:
        raise FlaxvisionError(f"cannot read {path}: {err}; restore the file") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FlaxvisionError(f"cannot read record {number} of {path}: {err}; restore the file") from None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise FlaxvisionError(f"record {number} of {path} is {line[:60]!r}, not a metrics record (an object with a "
                                  "type); restore the file")  # fmt: skip
        for field in DRAWN.get(record["type"], ()):
            value = record.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FlaxvisionError(f"record {number} of {path} ({record['type']}) has {field} {value!r}, not a "
                                      "number; restore the file")  # fmt: skip
        records.append(record)
    return records


def read_object(path: Path) -> dict[str, Any] | None:
    """A run file that holds one JSON object (config.json, eval.json, summary.json); None when there is none."""
    value = files.read_json(path)
    if value is not None and not isinstance(value, dict):
        raise FlaxvisionError(f"{path} holds {type(value).__name__} {str(value)[:40]}, not a JSON object; restore the file")
    return value


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FlaxvisionError(f"{run_dir} is not a flaxvision run directory (no metrics.jsonl); pass the run's directory")
    return read_records(path)


def _names(labels: np.ndarray, class_names: list[str] | None) -> list[str]:
    return [class_names[int(i)] if class_names and int(i) < len(class_names) else str(int(i)) for i in labels]


def _first_batch(loader: Any, count: int) -> dict[str, np.ndarray] | None:
    if loader is None:
        return None
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            batch = {"image": batch[0], "label": batch[1]}
        out = {k: np.asarray(v)[:count] for k, v in batch.items() if k in ("image", "label", "mask")}
        if "mask" in out:
            keep = out.pop("mask").astype(bool)
            out = {k: v[keep] for k, v in out.items()}
        return out if len(out["label"]) else None
    return None


def write_report(
    run_dir: str | Path,
    *,
    model: Any = None,
    train_data: Any = None,
    val_data: Any = None,
    stage: Any = None,
    schedule: Any = None,
    samples: int = 16,
    mistakes: int = 8,
    explain: int = 8,
    notes: list[str] | None = None,
) -> Path:
    """Draw every plot of a run into `run_dir` and write `run_dir/report.html`; return its path.

    Args:
      run_dir: a run directory (config.json, metrics.jsonl, eval.json, model/).
      model: the trained model for the prediction grid (None: no prediction grid).
      train_data, val_data: loaders for the sample grids (None: that grid is left out).
      stage: the run's `DeviceStage` (None: one without augmentation for the model's preprocessing).
      schedule: step -> learning rate, for the schedule plot (None: left out).
      samples: images per grid.
      mistakes: how many of the most confident mistakes to show; explain: how many explanation overlays.
      notes: lines the report lists (e.g. why a grid is missing).
    """
    from flaxvision.data.device import DeviceStage

    run_dir = Path(run_dir)
    records = _records(run_dir)
    record = read_object(run_dir / "config.json") or {}
    evaluation = read_object(run_dir / "eval.json")
    summary = read_object(run_dir / "summary.json")
    class_names = record.get("class_names") or (evaluation or {}).get("class_names")
    notes = list(notes or [])
    made: dict[str, Path] = {}
    captions: dict[str, str] = {}

    # ---- curves ----------------------------------------------------------------------------------------------
    if schedule is not None and "total_steps" in record:
        total = int(record["total_steps"])
        steps = np.arange(0, total + 1, max(1, total // 400))
        made["lr_schedule.png"] = plots.lr_schedule(steps, np.asarray([float(schedule(s)) for s in steps]), run_dir / "lr_schedule.png")
    train = [r for r in records if r["type"] == "train"]
    if train:
        made["train_loss.png"] = plots.train_loss([r["step"] for r in train], [r["loss"] for r in train], run_dir / "train_loss.png")
    evals = [r for r in records if r["type"] == "eval"]
    if evals:
        per_epoch = record.get("steps_per_epoch") or 1
        made["val_curves.png"] = plots.val_curves(
            [r["step"] / per_epoch for r in evals], [r["val_loss"] for r in evals], [r["val_accuracy"] for r in evals],
            run_dir / "val_curves.png",
            ema=([r["ema_val_loss"] for r in evals], [r["ema_val_accuracy"] for r in evals])
            if all("ema_val_accuracy" in r and "ema_val_loss" in r for r in evals) else None,
        )  # fmt: skip
    if evaluation and evaluation.get("confusion"):
        made["confusion_matrix.png"] = plots.confusion_matrix(np.asarray(evaluation["confusion"]), class_names or [], run_dir / "confusion_matrix.png")

    # ---- pictures of the data and the model's answers: through the run's device stage -------------------------
    if stage is None and model is not None:
        import jax

        stage = DeviceStage(model.preprocessing, devices=jax.devices()[:1], dtype=model.config.dtype)
    train_batch = _first_batch(train_data, samples)
    if train_batch is not None and stage is not None:
        import jax

        images = stage.show(train_batch["image"], jax.random.key(0))
        made["train_samples.png"] = plots.image_grid(images, _names(train_batch["label"], class_names), "Training samples after augmentation", run_dir / "train_samples.png")
    val_batch = _first_batch(val_data, samples)
    if val_batch is not None and stage is not None:
        images = stage.show(val_batch["image"], None) if val_batch["image"].dtype != np.uint8 else val_batch["image"]
        made["val_samples.png"] = plots.image_grid(images, _names(val_batch["label"], class_names), "Validation samples", run_dir / "val_samples.png")
        if model is not None:
            probs = _predict(model, stage, val_batch["image"])
            made["predictions.png"] = plots.prediction_grid(
                images, _names(val_batch["label"], class_names), _names(probs.argmax(-1), class_names), probs.max(-1).tolist(),
                run_dir / "predictions.png",
            )  # fmt: skip

    # ---- the model's answers on the whole validation data: calibration, mistakes, explanations -----------------
    sections: dict[str, str] = {}
    confusion = np.asarray(evaluation["confusion"]) if evaluation and evaluation.get("confusion") else None
    if model is not None and stage is not None and val_data is not None:
        try:
            found = analysis.validation_pass(model, stage, val_data, keep=mistakes)
        except FlaxvisionError as err:
            notes.append(f"calibration and mistakes left out: {err}")
        else:
            sections["calibration"] = _calibration(found, run_dir, made)
            import jax

            if jax.process_count() > 1:
                notes.append(f"calibration and mistakes: process 0's share of the validation data ({len(found.labels)} "
                             "images); the per-class table covers all of it")  # fmt: skip
            if len(found.mistake_labels):
                made["mistakes.png"] = plots.prediction_grid(
                    found.mistake_images, _names(found.mistake_labels, class_names),
                    _names(found.mistake_predictions, class_names), found.mistake_probabilities.tolist(),
                    run_dir / "mistakes.png", title="The most confident mistakes (validation)",
                )  # fmt: skip
            if confusion is None:
                confusion = analysis.confusion_of(found, model.config.num_classes)
        if val_batch is not None and val_batch["image"].dtype == np.uint8:
            try:
                method, predicted, overlays = analysis.explanations(model, stage, val_batch["image"][:explain])
            except FlaxvisionError as err:
                notes.append(f"explanation overlays left out: {err}")
            else:
                titles = [f"pred: {n}" for n in _names(predicted, class_names)]
                made["explanations.png"] = plots.image_grid(overlays, titles, f"Where the model looked: {EXPLAINED_BY[method]}",
                                                            run_dir / "explanations.png")  # fmt: skip
                captions["explanations.png"] = f"Where the model looked: {EXPLAINED_BY[method]}, on validation images"
    if confusion is not None:
        names = list(class_names or [str(i) for i in range(len(confusion))])
        if len(names) == len(confusion):
            sections["per_class"] = _per_class(confusion, names)

    return files.write_atomic(run_dir / "report.html", _html(run_dir, made, summary, record, notes, sections, captions))


def _calibration(found: analysis.ValidationPass, run_dir: Path, made: dict[str, Path]) -> str:
    from flaxvision import metrics

    values = metrics.calibration(found.logits, found.labels)
    bins = metrics.calibration_bins(found.probabilities, found.labels)
    made["reliability.png"] = plots.reliability_diagram(bins, values["ece"], run_dir / "reliability.png")
    rows = [("images", len(found.labels)), ("NLL", values["nll"]), ("Brier score", values["brier"]),
            (f"ECE ({metrics.ECE_BINS} bins)", values["ece"]), ("fitted softmax temperature", values["temperature"]),
            ("NLL after it", values["nll_after_temperature"]), ("ECE after it", values["ece_after_temperature"])]  # fmt: skip
    return "<h2>Calibration</h2>\n" + page.table(("", "value"), rows, row_headers=True)


def _per_class(confusion: np.ndarray, names: list[str]) -> str:
    rows = analysis.per_class_rows(confusion, names)
    shown = rows if len(rows) <= PER_CLASS_ROWS else rows[:PER_CLASS_ROWS]
    note = (f"<p>The {PER_CLASS_ROWS} classes with the lowest F1 of {len(rows)}; eval.json and "
            "<code>flaxvision evaluate</code> have them all.</p>") if len(shown) < len(rows) else ""  # fmt: skip
    table = page.table(("class", "precision", "recall", "F1", "support"),
                       [(r["class"], r["precision"], r["recall"], r["f1"], r["support"]) for r in shown])  # fmt: skip
    return "<h2>Per class (validation), lowest F1 first</h2>\n" + note + table


def _predict(model: Any, stage: Any, images: np.ndarray) -> np.ndarray:
    import jax

    model.eval()
    logits = model(stage.eval_inputs(jax.numpy.asarray(images)))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def _html(run_dir: Path, made: dict[str, Path], summary: Any, record: dict[str, Any], notes: list[str],
          sections: dict[str, str], captions: dict[str, str]) -> str:  # fmt: skip
    rows = [(key, value) for key, value in (summary or {}).items()]
    config = record.get("train_config", {})
    figures = {name: page.figure(made[name], captions.get(name, caption)) for name, caption in PLOTS.items() if name in made}
    curves = "".join(figures.get(n, "") for n in ("lr_schedule.png", "train_loss.png", "val_curves.png"))
    data = "".join(figures.get(n, "") for n in ("train_samples.png", "val_samples.png", "predictions.png"))
    answers = "".join(figures.get(n, "") for n in ("confusion_matrix.png", "mistakes.png", "explanations.png"))
    notes_html = "".join(f"<li>{page.escape(n)}</li>" for n in notes)
    e = page.escape
    body = f"""<h1>flaxvision run <code>{e(run_dir.name)}</code></h1>
<p>model <code>{e(config.get("model", "?"))}</code>, dataset <code>{e(config.get("dataset", "?"))}</code>,
{e(config.get("epochs", "?"))} epochs, batch {e(config.get("batch_size", "?"))},
{e(config.get("optimizer", "?"))} lr {e(config.get("lr", "?"))}</p>
{page.table(("", ""), rows, row_headers=True) if rows else ""}
{f"<ul>{notes_html}</ul>" if notes else ""}
{curves}{data}
{sections.get("per_class", "")}
{sections.get("calibration", "")}{figures.get("reliability.png", "")}
{answers}"""
    return page.page(f"flaxvision run: {run_dir.name}", body)
