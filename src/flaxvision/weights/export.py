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

import flaxvision.weights.gray_stem as gray_stem
import flaxvision.weights.native_format as native_format
import flaxvision.weights.npz_format as npz_format
from flaxvision.errors import FlaxvisionError
from flaxvision.files import write_atomic, write_json
from flaxvision.models.base import Classifier
from flaxvision.models.lora import lora_spec
from flaxvision.models.registry import default_preprocessing
from flaxvision.weights.convert import describe_nonfinite, nonfinite_tensors, weight_state
from flaxvision.weights.layouts import FORMATS, writer


def _write_json(path: Path, content: dict) -> None:
    write_json(path, content)


def save_pretrained(model: Classifier, out: str | Path, *, format: str = "flaxvision") -> Path:
    """Save a model's weights, config, label names and preprocessing in one of the supported formats.

    Args:
      model: a flaxvision model; `flaxvision.weights.layouts.export_formats(model.config)` lists the formats
        that can hold it, the preferred first (a plain ViT: transformers, timm, npz, flaxvision).
      out: output directory (created), or for format="npz" a file path ending in .npz (else DIR/model.npz).
      format: "flaxvision" (config.json + model.safetensors, every model), "transformers" (config.json,
        preprocessor_config.json, model.safetensors for the family's transformers class), "timm" (config.json +
        model.safetensors for timm) or "npz" (vision_transformer / big_vision layout). A 1-channel model's
        transformers export has a 3-channel stem (the kernel times the luma weights, mean/std replicated, config.json
        num_channels 3): transformers' pipeline feeds RGB, and RGB in gives what the model computes on the image's
        luma (`flaxvision.weights.gray_stem`); load_pretrained reads it back as the 1-channel model, bit for bit.

    Returns:
      The directory written, or the .npz file.
    """
    if format not in FORMATS:
        raise FlaxvisionError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    config = model.config
    if lora_spec(model) is not None:  # its LoRA tensors have no place in any format; merged, they do
        raise FlaxvisionError(f"the model carries LoRA adapters, which format {format!r} cannot hold; save "
                              "merge_lora(model) instead (or the adapter alone with save_adapter)")  # fmt: skip
    layout = writer(format, config)
    prep = getattr(model, "preprocessing", None) or default_preprocessing(config)
    labels = getattr(model, "label_names", None)
    # Everything a format cannot hold is refused before any file is written.
    if format == "npz":
        npz_format.check_exportable(config)
        files: dict = {}
    elif format == "flaxvision":
        info = native_format.describe(config, prep, labels)
        files = {"config.json": info}
    elif format == "transformers" and config.in_chans == 1:  # transformers feeds RGB: a luma-tiled stem (gray_stem)
        files = layout.config_files(gray_stem.rgb_config(config), prep.for_channels(3), labels)
        files["config.json"][gray_stem.MARKER] = gray_stem.marker()
    else:
        files = layout.config_files(config, prep, labels)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in weight_state(model).items()}
    found = nonfinite_tensors(params)
    if found:  # a file that loads into a NaN model helps nobody: refuse, before anything is written
        raise FlaxvisionError(f"the model's {describe_nonfinite(found)}; nothing was written - export a model with finite weights")
    if format == "transformers" and config.in_chans == 1:
        params, config = gray_stem.tile(params, layout.STEM_KERNEL), gray_stem.rgb_config(config)

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
    if format == "flaxvision":
        tensors, metadata = params, {"format": native_format.FORMAT, native_format.METADATA_KEY: json.dumps(info)}
    else:
        tensors, metadata = layout.from_flaxvision(params, config), {"format": "pt"}

    from safetensors.numpy import save

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    # Serialised in memory and written atomically (safetensors' save_file creates its file with mode 0600).
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    write_atomic(directory / "model.safetensors", data)
    for name, content in files.items():
        _write_json(directory / name, content)
    return directory
