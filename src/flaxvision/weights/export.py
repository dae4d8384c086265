"""`save_pretrained`: a flaxvision model -> checkpoint files other tools (and `load_pretrained`) read.

    >>> flaxvision.save_pretrained(model, "out/vit-food20", format="transformers")  # ViTForImageClassification.from_pretrained
    >>> flaxvision.save_pretrained(model, "out/vit-timm", format="timm")            # timm.create_model("local-dir:out/vit-timm")
    >>> flaxvision.save_pretrained(model, "out/vit.npz", format="npz")              # big_vision / timm's npz loader
    >>> flaxvision.save_pretrained(resnet, "out/resnet")                            # flaxvision format, any family
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.models.base import Classifier
from flaxvision.models.registry import default_preprocessing
from flaxvision.models.vit import ViTConfig
from flaxvision.weights import native, npz, timm, transformers
from flaxvision.weights.convert import weight_state

FORMATS = ("flaxvision", "transformers", "timm", "npz")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def save_pretrained(model: Classifier, out: str | Path, *, format: str = "flaxvision") -> Path:
    """Save a model's weights, config, label names and preprocessing in one of the supported formats.

    Args:
      model: a flaxvision model (ViT for every format; ResNet and CNN in the flaxvision format).
      out: output directory (created), or for format="npz" a file path ending in .npz (else DIR/model.npz).
      format: "flaxvision" (config.json + model.safetensors, every family), "transformers" (config.json,
        preprocessor_config.json, model.safetensors for ViTForImageClassification), "timm" (config.json +
        model.safetensors for timm's VisionTransformer) or "npz" (vision_transformer / big_vision layout).

    Returns:
      The directory written, or the .npz file.
    """
    if format not in FORMATS:
        raise FlaxvisionError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    config = model.config
    if format != "flaxvision" and not isinstance(config, ViTConfig):
        raise FlaxvisionError(
            f"format {format!r} holds Vision Transformers only; save this {type(model).__name__} with format='flaxvision'"
        )
    prep = getattr(model, "preprocessing", None) or default_preprocessing(config)
    labels = getattr(model, "label_names", None)
    # Everything a format cannot hold is refused before any file is written.
    if format == "transformers":
        files = transformers.config_files(config, prep, labels)
    elif format == "timm":
        files = timm.config_files(config, prep, labels)
    elif format == "npz":
        npz.check_exportable(config)
    else:
        info = native.describe(config, prep, labels)
        files = {"config.json": info}
    params = {k: np.asarray(v, dtype=np.float32) for k, v in weight_state(model).items()}

    if format == "npz":
        path = Path(out)
        if path.suffix != ".npz":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "model.npz"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tensors = npz.from_flaxvision(params, config)
        np.savez(path, **{k: np.ascontiguousarray(v) for k, v in tensors.items()})
        return path
    if format == "transformers":
        tensors, metadata = transformers.from_flaxvision(params, config), {"format": "pt"}
    elif format == "timm":
        tensors, metadata = timm.from_flaxvision(params, config), {"format": "pt"}
    else:
        tensors, metadata = params, {"format": native.FORMAT, native.METADATA_KEY: json.dumps(info)}

    from safetensors.numpy import save_file

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"), metadata=metadata)
    for name, content in files.items():
        _write_json(directory / name, content)
    return directory
