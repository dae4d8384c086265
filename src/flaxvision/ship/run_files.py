"""What a model card is made of: the JSON files of a finished run (config.json, summary.json, eval.json,
eval_ema.json, metrics.jsonl, skipped_images_val.json, model/config.json), read without jax or the model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flaxvision.errors import FlaxvisionError
from flaxvision.files import read_json, read_lines

LAYOUTS = ("transformers", "timm", "flaxvision")  # the weight layouts a Hub repo can hold (first: preferred)
NOT_RECORDED = "not recorded"
RECORDS_DIR = "flaxvision_run"  # where `flaxvision push` puts the run's own JSON files in the repo
RECORDS = ("config.json", "summary.json", "eval.json", "eval_ema.json", "metrics.jsonl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_id(spec: Any) -> str | None:
    """`spec` without its @revision when it names a Hub repo (owner/name, not a path that exists here), else None."""
    if not isinstance(spec, str) or spec.startswith(("builtin:", ".", "/", "~")) or Path(spec).exists():
        return None
    return spec.split("@", 1)[0] if _HUB_ID.match(spec) else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The JSON files of a finished run: {"config", "summary", "eval", "eval_ema", "metrics", "val_source", "model"}
    (None or [] for what is missing). A directory without config.json and summary.json is refused: one line."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FlaxvisionError(f"{run_dir} is not a directory; pass a run directory (flaxvision train --run-dir)")
    config, summary = read_json(run / "config.json"), read_json(run / "summary.json")
    if config is None or "train_config" not in config:
        raise FlaxvisionError(
            f"{run_dir} is not a flaxvision run directory (no config.json with a train_config); "
            "pass the --run-dir of a `flaxvision train` run"
        )
    if summary is None:
        raise FlaxvisionError(
            f"{run_dir} holds no summary.json: the run has not finished; finish it first "
            f"(flaxvision train --run-dir {run_dir} --resume)"
        )
    metrics = []
    if (run / "metrics.jsonl").is_file():
        for line in read_lines(run / "metrics.jsonl"):
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    val_source = (read_json(run / "skipped_images_val.json") or {}).get("dataset")
    return {
        "config": config,
        "summary": summary,
        "eval": read_json(run / "eval.json"),
        "eval_ema": read_json(run / "eval_ema.json"),
        "metrics": metrics,
        "val_source": val_source,
        "model": read_json(run / "model" / "config.json"),
    }


def model_layout(model_json: dict[str, Any] | None) -> str | None:
    """The layout of a model directory's config.json: flaxvision's own, timm's or transformers'."""
    if not model_json:
        return None
    if model_json.get("format") == "flaxvision":
        return "flaxvision"
    if "architecture" in model_json and "model_args" in model_json:
        return "timm"
    return "transformers" if "model_type" in model_json else None


def val_split(records: dict[str, Any]) -> str:
    """The evaluation split: the data loader's source name ("spec[validation]", "spec[train held-out 0.2]") when
    recorded, else the recipe's val_split."""
    source = records.get("val_source")
    if isinstance(source, str) and source.endswith("]") and "[" in source:
        return source[source.rindex("[") + 1 : -1]
    return records["config"]["train_config"].get("val_split") or NOT_RECORDED
