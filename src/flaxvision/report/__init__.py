"""Run reports: PNG plots in the run directory, gathered in a self-contained report.html.

    flaxvision.report.write_report("runs/x")          # from metrics.jsonl, eval.json and the exported model

The HTML embeds every picture (data: URIs), so it opens in a browser with no network and survives being copied.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise FlaxvisionError(f"cannot read {path}: {err}") from None


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FlaxvisionError(f"{run_dir} is not a flaxvision run directory (no metrics.jsonl); pass the run's directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def _displayable(images: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """uint8 for the grids; normalised float batches are mapped back to pixels."""
    if images.dtype == np.uint8:
        return images
    pixels = (images * np.asarray(std) + np.asarray(mean)) * 255.0
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_report(
    run_dir: str | Path,
    *,
    model: Any = None,
    train_data: Any = None,
    val_data: Any = None,
    samples: int = 16,
) -> Path:
    """Draw every plot of a run into `run_dir` and write `run_dir/report.html`; return its path.

    Args:
      run_dir: a run directory (config.json, metrics.jsonl, eval.json, model/).
      model: the trained model for the prediction grid (default: `run_dir/model`, loaded with load_pretrained).
      train_data, val_data: loaders for the sample grids (default: rebuilt from the run's dataset spec when it is
        one flaxvision can open; otherwise the grids are left out and the report says so).
      samples: images per grid.
    """
    from flaxvision.train.config import TrainConfig
    from flaxvision.train.optim import learning_rate_schedule

    run_dir = Path(run_dir)
    records = _records(run_dir)
    record = _read_json(run_dir / "config.json") or {}
    evaluation = _read_json(run_dir / "eval.json")
    summary = _read_json(run_dir / "summary.json")
    class_names = record.get("class_names") or (evaluation or {}).get("class_names")
    notes: list[str] = []
    made: dict[str, Path] = {}

    # ---- curves ----------------------------------------------------------------------------------------------
    if "train_config" in record:
        config = TrainConfig.from_dict(record["train_config"])
        total = int(record["total_steps"])
        steps = np.arange(0, total + 1, max(1, total // 400))
        schedule = learning_rate_schedule(config, total)
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
        )  # fmt: skip
    if evaluation and evaluation.get("confusion"):
        made["confusion_matrix.png"] = plots.confusion_matrix(np.asarray(evaluation["confusion"]), class_names or [], run_dir / "confusion_matrix.png")

    # ---- pictures of the data and the model's answers -----------------------------------------------------------
    if model is None and (run_dir / "model").is_dir():
        try:
            from flaxvision.weights import load_pretrained

            model = load_pretrained(run_dir / "model")
        except (ImportError, FlaxvisionError) as err:
            notes.append(f"prediction grid left out: the exported model could not be loaded ({err})")
    if (train_data is None or val_data is None) and "train_config" in record and model is not None:
        try:
            from flaxvision.train.loop import data_from_config

            built_train, built_val, *_ = data_from_config(TrainConfig.from_dict(record["train_config"]), model)
            train_data, val_data = train_data or built_train, val_data or built_val
        except FlaxvisionError as err:
            notes.append(f"sample grids left out: the dataset could not be opened ({err})")
    pre = model.preprocessing if model is not None else None
    mean, std = (pre.mean, pre.std) if pre else ((0.0,), (1.0,))
    train_batch = _first_batch(train_data, samples)
    if train_batch is not None:
        images = _displayable(train_batch["image"], mean, std)
        made["train_samples.png"] = plots.image_grid(images, _names(train_batch["label"], class_names), "Training samples after augmentation", run_dir / "train_samples.png")
    val_batch = _first_batch(val_data, samples)
    if val_batch is not None:
        images = _displayable(val_batch["image"], mean, std)
        made["val_samples.png"] = plots.image_grid(images, _names(val_batch["label"], class_names), "Validation samples", run_dir / "val_samples.png")
        if model is not None:
            probs = _predict(model, val_batch["image"])
            made["predictions.png"] = plots.prediction_grid(
                images, _names(val_batch["label"], class_names), _names(probs.argmax(-1), class_names), probs.max(-1).tolist(),
                run_dir / "predictions.png",
            )  # fmt: skip

    path = run_dir / "report.html"
    path.write_text(_html(run_dir, made, summary, record, notes))
    return path


def _predict(model: Any, images: np.ndarray) -> np.ndarray:
    import jax

    from flaxvision.train.step import normalize

    model.eval()
    pre = model.preprocessing
    logits = model(normalize(jax.numpy.asarray(images), pre.mean, pre.std))
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
