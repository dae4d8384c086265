"""`save_pretrained`: a flaxvision model -> weight files other tools (and `load_pretrained`) read.

    >>> flaxvision.save_pretrained(model, "out/vit-food20", format="transformers")  # ViTForImageClassification.from_pretrained
    >>> flaxvision.save_pretrained(model, "out/vit-timm", format="timm")            # timm.create_model("local-dir:out/vit-timm")
    >>> flaxvision.save_pretrained(model, "out/vit.npz", format="npz")              # big_vision / timm's npz loader
    >>> flaxvision.save_pretrained(resnet, "out/resnet")                            # flaxvision format, any family
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

import flaxvision.weights.native_format as native_format
import flaxvision.weights.npz_format as npz_format
import flaxvision.weights.timm_format as timm_format
import flaxvision.weights.transformers_format as transformers_format
from flaxvision.errors import FlaxvisionError
from flaxvision.files import write_atomic, write_json
from flaxvision.models.base import Classifier
from flaxvision.models.lora import lora_spec
from flaxvision.models.registry import default_preprocessing, name_of
from flaxvision.weights.convert import weight_state

# Every format save_pretrained writes; which of them a model can be saved in is `model.config.export_formats`.
FORMATS = ("flaxvision", "transformers", "timm", "npz")


def _write_json(path: Path, content: dict) -> None:
    write_json(path, content)


def save_pretrained(model: Classifier, out: str | Path, *, format: str = "flaxvision") -> Path:
    """Save a model's weights, config, label names and preprocessing in one of the supported formats.

    Args:
      model: a flaxvision model; `model.config.export_formats` lists the formats it fits, the preferred first
        (a ViT: transformers, timm, npz, flaxvision; ResNet and CNN: flaxvision).
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
    if lora_spec(model) is not None:  # its LoRA tensors have no place in any format; merged, they do
        raise FlaxvisionError(f"the model carries LoRA adapters, which format {format!r} cannot hold; save "
                              "merge_lora(model) instead (or the adapter alone with save_adapter)")  # fmt: skip
    if format not in config.export_formats:
        choices = " or ".join(repr(f) for f in config.export_formats)
        raise FlaxvisionError(f"format {format!r} cannot hold {name_of(config)}; save it with format={choices}")
    prep = getattr(model, "preprocessing", None) or default_preprocessing(config)
    labels = getattr(model, "label_names", None)
    # Everything a format cannot hold is refused before any file is written.
    if format == "transformers":
        files = transformers_format.config_files(config, prep, labels)
    elif format == "timm":
        files = timm_format.config_files(config, prep, labels)
    elif format == "npz":
        npz_format.check_exportable(config)
    else:
        info = native_format.describe(config, prep, labels)
        files = {"config.json": info}
    params = {k: np.asarray(v, dtype=np.float32) for k, v in weight_state(model).items()}

    if format == "npz":
        path = Path(out)
        if path.suffix != ".npz":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "model.npz"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tensors = npz_format.from_flaxvision(params, config)
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in tensors.items()})  # pyright: ignore[reportArgumentType]
        write_atomic(path, buffer.getvalue())
        return path
    if format == "transformers":
        tensors, metadata = transformers_format.from_flaxvision(params, config), {"format": "pt"}
    elif format == "timm":
        tensors, metadata = timm_format.from_flaxvision(params, config), {"format": "pt"}
    else:
        tensors, metadata = params, {"format": native_format.FORMAT, native_format.METADATA_KEY: json.dumps(info)}

    from safetensors.numpy import save

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    # Serialised in memory and written atomically (safetensors' save_file creates its file with mode 0600).
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    write_atomic(directory / "model.safetensors", data)
    for name, content in files.items():
        _write_json(directory / name, content)
    return directory
