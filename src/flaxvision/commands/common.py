"""What several subcommands share: finding the model of a run directory, a model directory or a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaxvision.errors import FlaxvisionError


def load_model(source: str, weights: str = "raw", nonfinite: str = "warn") -> Any:
    """A run directory (its model/, or with weights="ema" its model_ema/), a model directory, a weights file, a Hub
    id or a LoRA adapter directory (onto the base it names: the model keeps its adapters, unmerged) -> a model in
    eval mode. `nonfinite`: NaN/Inf weights are a warning ("warn": predict, evaluate) or an error ("error": export)."""
    from flaxvision.weights import load_adapter, load_pretrained
    from flaxvision.weights.adapter import is_adapter_dir

    path = Path(source)
    if weights == "ema":
        if not (path / "model_ema").is_dir():
            raise FlaxvisionError(f"{source} has no model_ema/ (EMA weights): --weights ema needs a run directory "
                                  "trained with --ema-decay; drop --weights ema for its raw weights")  # fmt: skip
        path = path / "model_ema"
    elif is_adapter_dir(path):
        return load_adapter(path)
    elif path.is_dir() and (path / "model").is_dir():
        path = path / "model"
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FlaxvisionError(f"{source!r} is not a run directory, a model directory or a Hub id; check the path")
    model = load_pretrained(str(path) if path.exists() else source, nonfinite=nonfinite)
    model.eval()
    return model


def class_names_of(model: Any) -> list[str]:
    return model.class_names()
