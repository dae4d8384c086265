"""Run reports: PNG plots in the run directory, gathered in a self-contained report.html.

    flaxvision.report.write_report("runs/x", model=model, train_data=train, val_data=val, stage=stage,
                                   schedule=schedule)     # what fit passes; `flaxvision report` rebuilds them

The HTML embeds every picture (data: URIs), so it opens in a browser with no network and survives being copied.
The report reads the run directory and draws; it builds nothing itself (the `report` command rebuilds the model,
the loaders and the device stage from the run's recipe with flaxvision.train.recipe), so the training samples it
shows went through the same device stage, colour jitter included, as the model's inputs.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision import files
from flaxvision.errors import FlaxvisionError
from flaxvision.report import plots

PLOTS = {
    "lr_schedule.png": "Learning-rate schedule",
    "train_loss.png": "Training loss per step",
    "val_curves.png": "Validation loss and accuracy per epoch",
    "train_samples.png": "Training samples after augmentation",
    "val_samples.png": "Validation samples",
    "predictions.png": "Predictions on validation images",
    "confusion_matrix.png": "Confusion matrix",
}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FlaxvisionError(f"{run_dir} is not a flaxvision run directory (no metrics.jsonl); pass the run's directory")
    try:
        return [json.loads(line) for line in files.read_lines(path)]
    except (OSError, json.JSONDecodeError) as err:
        raise FlaxvisionError(f"cannot read {path}: {err}") from None


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
      notes: lines the report lists (e.g. why a grid is missing).
    """
    from flaxvision.data.device import DeviceStage

    run_dir = Path(run_dir)
    records = _records(run_dir)
    record = files.read_json(run_dir / "config.json") or {}
    evaluation = files.read_json(run_dir / "eval.json")
    summary = files.read_json(run_dir / "summary.json")
    class_names = record.get("class_names") or (evaluation or {}).get("class_names")
    notes = list(notes or [])
    made: dict[str, Path] = {}

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
            if all("ema_val_accuracy" in r for r in evals) else None,
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

    return files.write_atomic(run_dir / "report.html", _html(run_dir, made, summary, record, notes))


def _predict(model: Any, stage: Any, images: np.ndarray) -> np.ndarray:
    import jax

    model.eval()
    logits = model(stage.eval_inputs(jax.numpy.asarray(images)))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def _html(run_dir: Path, made: dict[str, Path], summary: Any, record: dict[str, Any], notes: list[str]) -> str:
    rows = ""
    if summary:
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
            rows += f"<tr><th>{html.escape(key)}</th><td>{shown}</td></tr>"
    config = record.get("train_config", {})
    figures = ""
    for name, caption in PLOTS.items():
        if name in made:
            data = base64.b64encode(made[name].read_bytes()).decode("ascii")
            figures += (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" data-file="{name}">'
                        f"<figcaption>{html.escape(caption)} ({name})</figcaption></figure>\n")  # fmt: skip
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flaxvision run: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1000px; color: #1f2328; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }} th, td {{ padding: 2px 12px; text-align: left; }}
th {{ color: #59636e; font-weight: normal; }} figure {{ margin: 1.5rem 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #59636e; font-size: 0.9rem; }} code {{ background: #f6f8fa; padding: 1px 4px; }}
</style></head><body>
<h1>flaxvision run <code>{html.escape(run_dir.name)}</code></h1>
<p>model <code>{html.escape(str(config.get("model", "?")))}</code>, dataset <code>{html.escape(str(config.get("dataset", "?")))}</code>,
{html.escape(str(config.get("epochs", "?")))} epochs, batch {html.escape(str(config.get("batch_size", "?")))},
{html.escape(str(config.get("optimizer", "?")))} lr {html.escape(str(config.get("lr", "?")))}</p>
<table>{rows}</table>
{f"<ul>{notes_html}</ul>" if notes else ""}
{figures}
</body></html>
"""
