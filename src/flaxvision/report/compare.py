"""`flaxvision compare`: several runs on one self-contained HTML page.

    write_compare(["runs/a", "runs/b"], "compare/")    # -> compare/compare.html

The page overlays the runs' curves (per epoch, so runs of other batch sizes line up), lists only the recipe fields
that differ, and puts the final metrics side by side. Every run is read and checked before anything is written;
the page is the only file written, in one atomic step, and a run directory is never written into.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision import files
from flaxvision.errors import FlaxvisionError
from flaxvision.report import page, plots, read_object, read_records

PAGE = "compare.html"
METRICS = (  # (label, summary.json field); the last evaluation stands in for a run that has not finished
    ("final val top-1", "final_val_accuracy"), ("best val top-1", "best_val_accuracy"),
    ("final val top-5", "final_val_top5_accuracy"), ("final val loss", "final_val_loss"),
    ("final EMA val top-1", "final_ema_val_accuracy"), ("steps", "steps"), ("epochs", "epochs"),
    ("train images/s", "train_images_per_second"), ("wall seconds", "wall_seconds"),
    ("compile seconds", "compile_seconds"), ("devices", "devices"),
)  # fmt: skip


class Run:
    """One run directory, read whole: its records, its recipe, its summary (None while unfinished)."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_dir():
            raise FlaxvisionError(f"{path} is not a directory; pass run directories (what `flaxvision train` wrote)")
        for name in ("metrics.jsonl", "config.json"):
            if not (path / name).is_file():
                raise FlaxvisionError(f"{path} is not a flaxvision run directory (no {name}); pass run directories")
        self.records = read_records(path / "metrics.jsonl")
        record = files.read_json(path / "config.json")
        if not isinstance(record, dict) or not isinstance(record.get("train_config"), dict):
            raise FlaxvisionError(f"{path / 'config.json'} holds no run recipe (train_config); pass run directories")
        self.record: dict[str, Any] = record
        self.summary = read_object(path / "summary.json")
        per_epoch = record.get("steps_per_epoch") or 1
        if isinstance(per_epoch, bool) or not isinstance(per_epoch, int):
            raise FlaxvisionError(f"{path / 'config.json'} has steps_per_epoch {per_epoch!r}, not a whole number; "
                                  "restore the file")  # fmt: skip
        self.per_epoch = max(1, per_epoch)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    def metrics(self) -> dict[str, Any]:
        if self.summary is not None:
            return {"status": "finished", **self.summary}
        evals, steps = self.of("eval"), [r.get("step", 0) for r in self.records]
        last = evals[-1] if evals else {}
        return {"status": f"unfinished (step {max(steps, default=0)})", "final_val_accuracy": last.get("val_accuracy"),
                "final_val_top5_accuracy": last.get("val_top5_accuracy"), "final_val_loss": last.get("val_loss"),
                "best_val_accuracy": max((r["val_accuracy"] for r in evals), default=None), "steps": max(steps, default=0)}  # fmt: skip


def labels_of(paths: list[Path]) -> list[str]:
    """The runs' directory names, with their parents where two names are the same."""
    names = [p.name for p in paths]
    return [str(Path(p.parent.name) / p.name) if names.count(p.name) > 1 else p.name for p in paths]


def recipe_differences(runs: list[Run], section: str = "train_config") -> list[tuple[str, list[Any]]]:
    """(field, the value in each run) for the fields of `section` whose values are not all the same; a field a run
    does not have shows as None."""
    dicts = [r.record.get(section) or {} for r in runs]
    fields = sorted(set().union(*dicts))
    out = []
    for field in fields:
        values = [d.get(field) for d in dicts]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            out.append((field, values))
    return out


def _shown(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def _check_out(out: Path, runs: list[Run]) -> None:
    if out.exists() and not out.is_dir():
        raise FlaxvisionError(f"--out {out} exists and is not a directory; pass a directory for {PAGE}")
    resolved = out.resolve()
    for run in runs:
        inside = run.path.resolve()
        if resolved == inside or inside in resolved.parents:
            raise FlaxvisionError(f"--out {out} is inside the run directory {run.path}; a comparison is written "
                                  "outside the runs it compares (pass another --out)")  # fmt: skip


def write_compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Compare the runs in `run_dirs` on one page, `out/compare.html`; return its path."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise FlaxvisionError(f"compare needs at least two run directories, got {len(paths)}")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise FlaxvisionError(f"{p} is given twice (as {seen[p.resolve()]} and {p}); pass each run once")
        seen[p.resolve()] = p
    runs = [Run(p) for p in paths]
    out = Path(out)
    _check_out(out, runs)
    labels = labels_of(paths)

    with tempfile.TemporaryDirectory(prefix="flaxvision-compare-") as tmp:
        figures = _figures(runs, labels, Path(tmp))
        body = _body(runs, labels, figures)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FlaxvisionError(f"cannot create --out {out}: {err.strerror or err}; pass a writable directory") from None
    return files.write_atomic(out / PAGE, page.page(f"flaxvision: {len(runs)} runs compared", body))


def _figures(runs: list[Run], labels: list[str], tmp: Path) -> str:
    html = ""
    train = [(label, [r["step"] / run.per_epoch for r in run.of("train")], [r["loss"] for r in run.of("train")])
             for run, label in zip(runs, labels)]  # fmt: skip
    if any(xs for _, xs, _ in train):
        html += page.figure(plots.overlaid(train, "epoch", "training loss", "Training loss", tmp / "train_loss.png"),
                            "Training loss of each run, per epoch")  # fmt: skip
    evals = [(label, run) for run, label in zip(runs, labels) if run.of("eval")]
    if evals:
        loss = [(label, [r["step"] / run.per_epoch for r in run.of("eval")], [r["val_loss"] for r in run.of("eval")])
                for label, run in evals]  # fmt: skip
        top1 = [(label, [r["step"] / run.per_epoch for r in run.of("eval")],
                 list(np.asarray([r["val_accuracy"] for r in run.of("eval")]) * 100)) for label, run in evals]  # fmt: skip
        html += page.figure(plots.overlaid(loss, "epoch", "validation loss", "Validation loss", tmp / "val_loss.png"),
                            "Validation loss of each run, per epoch")  # fmt: skip
        html += page.figure(plots.overlaid(top1, "epoch", "top-1 (%)", "Validation accuracy", tmp / "val_accuracy.png"),
                            "Validation top-1 of each run, per epoch")  # fmt: skip
    return html


def _body(runs: list[Run], labels: list[str], figures: str) -> str:
    e = page.escape
    listed = "".join(f"<li><code>{e(label)}</code>: {e(run.path)}</li>" for run, label in zip(runs, labels))
    metrics = [run.metrics() for run in runs]
    rows = [("status", *[m["status"] for m in metrics])]
    rows += [(label, *[m.get(key) for m in metrics]) for label, key in METRICS if any(m.get(key) is not None for m in metrics)]
    recipe = recipe_differences(runs)
    model = recipe_differences(runs, "model_config")
    recipe_html = (page.table(("field", *labels), [(f, *map(_shown, v)) for f, v in recipe], row_headers=True)
                   if recipe else "<p>The recipes are the same in every field.</p>")  # fmt: skip
    model_html = (page.table(("field", *labels), [(f, *map(_shown, v)) for f, v in model], row_headers=True)
                  if model else "")  # fmt: skip
    return f"""<h1>flaxvision: {len(runs)} runs compared</h1>
<ul>{listed}</ul>
<h2>Final metrics</h2>
{page.table(("", *labels), rows, row_headers=True)}
<h2>Recipe fields that differ</h2>
{recipe_html}{"<h2>Model fields that differ</h2>" + model_html if model_html else ""}
<h2>Curves</h2>
{figures}"""
