"""What the convolutional layouts (timm and transformers ResNet and ConvNeXt) share.

BatchNorm: PyTorch's weight / bias / running_mean / running_var <-> nnx.BatchNorm's scale / bias / mean / var
(running statistics are nnx.BatchStat); `num_batches_tracked` is a step counter that eval mode never reads: ignored
on import (reported in Parsed.ignored), written as 0 on export so that `load_state_dict(strict=True)` accepts the file.
Preprocessing: transformers' ResNet and ConvNeXt checkpoints ship a ConvNextImageProcessor (shortest_edge with
crop_pct, bicubic), timm's a pretrained_cfg (read by `timm_format.preprocessing` with the family's defaults).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.preprocessing import HALF, IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from flaxvision.weights.convert import Rule, copy
from flaxvision.weights.transformers_format import PIL_FILTERS

COUNTER = "num_batches_tracked"
# timm's pretrained_cfg defaults for its ResNet and ConvNeXt checkpoints (the a1_in1k / in12k_ft_in1k tags).
TIMM_CNN_DEFAULTS: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.95, "interpolation": "bicubic", "crop_mode": "center"}


def batchnorm(src: str, dst: str) -> list[Rule]:
    """A PyTorch BatchNorm2d at `src` ("layer1.0.bn1") <-> flaxvision's nnx.BatchNorm at `dst` ("stages.0.0.bn1")."""
    return [copy(f"{src}.weight", f"{dst}.scale"), copy(f"{src}.bias", f"{dst}.bias"),
            copy(f"{src}.running_mean", f"{dst}.mean"), copy(f"{src}.running_var", f"{dst}.var")]  # fmt: skip


def layer_norm(src: str, dst: str) -> list[Rule]:
    return [copy(f"{src}.weight", f"{dst}.scale"), copy(f"{src}.bias", f"{dst}.bias")]


def counters(tensors: Iterable[str]) -> tuple[str, ...]:
    """The BatchNorm step counters among the tensor names (never loaded)."""
    return tuple(sorted(k for k in tensors if k.endswith(f".{COUNTER}")))


def with_counters(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A PyTorch state dict with a 0 `num_batches_tracked` (int64, as PyTorch keeps it) beside every BatchNorm."""
    out = dict(state)
    for key in list(state):
        if key.endswith(".running_var"):
            out[key.removesuffix("running_var") + COUNTER] = np.zeros((), np.int64)
    return out


def require(tensors: dict[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in tensors:
        raise FlaxvisionError(f"{what}: cannot infer the architecture without '{key}'; pass the complete weights (with their config.json)")
    return tensors[key]


def stage_count(tensors: Iterable[str], template: str, start: int = 0) -> int:
    """How many consecutive stages s = start, start + 1, ... have a tensor starting with template.format(s)."""
    keys = tuple(tensors)
    count = 0
    while any(k.startswith(template.format(start + count)) for k in keys):
        count += 1
    return count


def processor_preprocessing(pre: dict[str, Any] | None, img_size: int) -> Preprocessing:
    """Preprocessing from a ConvNextImageProcessor's preprocessor_config.json (transformers' ResNet and ConvNeXt).

    Below 384 px it resizes the shortest edge to shortest_edge / crop_pct and centre-crops shortest_edge; from 384
    px on it squashes the image to shortest_edge x shortest_edge (no crop). Absent: its defaults (mean = std = 0.5,
    bicubic, crop_pct 224/256) at the model's size.
    """
    pre = pre or {}
    normalize = pre.get("do_normalize", True)
    mean = tuple(pre.get("image_mean", HALF)) if normalize else (0.0, 0.0, 0.0)
    std = tuple(pre.get("image_std", HALF)) if normalize else (1.0, 1.0, 1.0)
    resample = pre.get("resample", 3)
    interpolation = PIL_FILTERS.get(resample, resample if resample in PIL_FILTERS.values() else "bicubic")
    size = pre.get("size", {"shortest_edge": img_size})
    edge = size.get("shortest_edge", img_size) if isinstance(size, dict) else size
    crop_pct = float(pre.get("crop_pct") or 224 / 256)
    if not isinstance(edge, int) or isinstance(edge, bool) or edge < 1:
        raise FlaxvisionError(f"preprocessor_config.json: size {size!r} has no positive integer shortest_edge")
    if edge >= 384:
        return Preprocessing(img_size=img_size, mean=mean, std=std, crop_pct=1.0, resize_mode="squash", interpolation=interpolation)
    return Preprocessing(img_size=img_size, mean=mean, std=std, crop_pct=min(1.0, crop_pct), resize_mode="shortest", interpolation=interpolation)


def processor_config(prep: Preprocessing, img_size: int) -> dict[str, Any]:
    """A ConvNextImageProcessor preprocessor_config.json for this preprocessing (shortest edge + crop_pct)."""
    pil = {name: code for code, name in PIL_FILTERS.items()}
    return {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": img_size},
        "crop_pct": prep.crop_pct,
        "resample": pil[prep.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
    }
