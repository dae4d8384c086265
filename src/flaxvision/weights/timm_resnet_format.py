"""timm's ResNet weights (resnet18 / resnet34 / resnet50 ..., e.g. `timm/resnet50.a1_in1k`): model.safetensors + config.json.

Layout: conv1, bn1 (7x7 stem, 64 channels); layer{s+1}.{i}.conv1/bn1, conv2/bn2 (conv3/bn3 for bottlenecks),
downsample.0 (1x1 conv) / downsample.1 (BatchNorm); fc. Reading: the block type from conv3's presence, depths and
widths from the tensors, the preprocessing from pretrained_cfg (else timm's a1_in1k defaults: ImageNet mean/std,
crop_pct 0.95, bicubic). Variants of timm's ResNet that flaxvision's cannot express (deep stems resnet*d, average
-pool shortcuts, grouped ResNeXt convs, squeeze-excitation, wider bottlenecks) are refused, naming the option.
Writing: the same files, loadable by `timm.create_model(architecture, pretrained=False, **model_args)` +
`load_state_dict(strict=True)` (model_args: layers, channels, num_classes, in_chans).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

import flaxvision.weights.timm_format as timm_format
from flaxvision.errors import FlaxvisionError
from flaxvision.models.resnet import ResNetConfig
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.cnn_layouts import TIMM_CNN_DEFAULTS, batchnorm, counters, require, stage_count, with_counters
from flaxvision.weights.convert import (
    Parsed,
    Rule,
    block_count,
    check_supported,
    conv,
    copy,
    detect_timm,
    export,
    linear,
)
from flaxvision.weights.hub import WeightFiles

logger = logging.getLogger(__name__)

FORMAT = "timm"
FAMILY = "ResNet"
_ARCH = re.compile(r"^resnet\d+[a-z]?$")
STEM_WIDTH = 64  # timm's plain 7x7 stem always has 64 channels
# model_args flaxvision reads, those that do not change the weights, and the one value it supports of the rest.
ARGS_READ = {"layers", "channels", "num_classes", "in_chans", "block"}
ARGS_IGNORED = {"drop_rate", "zero_init_last", "block_args", "stem_width"}  # stem_width: deep stems only
ARGS_FIXED = {"output_stride": 32, "global_pool": "avg", "cardinality": 1, "base_width": 64, "stem_type": "",
              "replace_stem_pool": False, "block_reduce_first": 1, "down_kernel_size": 1, "avg_down": False,
              "aa_layer": None, "drop_path_rate": 0.0, "drop_block_rate": 0.0, "act_layer": "relu", "norm_layer": "batchnorm"}  # fmt: skip
UNSUPPORTED_KEYS = (("conv1.0.", "stem_type='deep' (resnet*c/d/e/s)"), (".se.", "squeeze-excitation (seresnet)"),
                    ("downsample.2.", "avg_down=True (average-pool shortcuts, resnet*d)"), (".attn.", "an attention block"))  # fmt: skip


def is_layout(keys: Any) -> bool:
    keys = set(keys)
    return "layer1.0.conv1.weight" in keys and ("conv1.weight" in keys or "conv1.0.weight" in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_timm(weights, lambda arch: bool(_ARCH.match(arch)), is_layout)


def exports(config: Any) -> bool:
    return isinstance(config, ResNetConfig) and refusal(config) is None and config.stem == "imagenet"


def refusal(config: Any) -> str | None:
    if isinstance(config, ResNetConfig) and config.stem == "imagenet" and config.stem_channels != STEM_WIDTH:
        return f"timm's ResNet has a {STEM_WIDTH}-channel stem, this model stem_width={config.stem_channels}"
    if isinstance(config, ResNetConfig) and len(config.stage_depths) > 4:
        return f"timm's ResNet has at most 4 stages, this model {len(config.stage_depths)}"
    return None


def rules(config: ResNetConfig, *, head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a timm ResNet."""
    out = [conv("conv1.weight", "conv1.kernel"), *batchnorm("bn1", "bn1")]
    cin = config.stem_channels
    for s, (depth, width) in enumerate(zip(config.stage_depths, config.stage_widths, strict=True)):
        cout = width * config.expansion
        for i in range(depth):
            src, dst = f"layer{s + 1}.{i}.", f"stages.{s}.{i}."
            for n in (1, 2, 3) if config.block == "bottleneck" else (1, 2):
                out += [conv(f"{src}conv{n}.weight", f"{dst}conv{n}.kernel"), *batchnorm(f"{src}bn{n}", f"{dst}bn{n}")]
            if (s > 0 and i == 0) or cin != cout:
                out += [conv(f"{src}downsample.0.weight", f"{dst}downsample_conv.kernel"), *batchnorm(f"{src}downsample.1", f"{dst}downsample_bn")]
            cin = cout
    if head:
        out += [linear("fc.weight", "head.kernel"), copy("fc.bias", "head.bias")]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ResNetConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> timm ResNet state dict (with BatchNorm step counters, for strict loading)."""
    return with_counters(export(rules(config), params))


def _check_supported(tensors: dict[str, np.ndarray], args: dict[str, Any], what: str) -> None:
    check_supported(tensors, args, what, "ResNet", unsupported_keys=UNSUPPORTED_KEYS, read=ARGS_READ, ignored=ARGS_IGNORED,
                    fixed=ARGS_FIXED, same=lambda value, only: value == only or str(value).lower() == str(only))


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of timm ResNet weights."""
    what = f"timm weights '{weights.origin}'"
    cfg = weights.config or {}
    args = dict(cfg.get("model_args") or {})
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    tensors = weights.tensors
    _check_supported(tensors, args, what)
    stem = require(tensors, "conv1.weight", what)  # (64, C, 7, 7)
    if tuple(stem.shape[2:]) != (7, 7):
        raise FlaxvisionError(f"{what}: conv1.weight {tuple(stem.shape)} is not a 7x7 stem; flaxvision reads timm's plain ResNet stem")
    bottleneck = "layer1.0.conv3.weight" in tensors
    depths, widths = [], []
    for s in range(1, 1 + stage_count(tensors, "layer{}.", start=1)):
        depths.append(block_count(tensors, f"layer{s}."))
        first = require(tensors, f"layer{s}.0.conv1.weight", what)
        widths.append(int(first.shape[0]))
        mid = require(tensors, f"layer{s}.0.conv2.weight", what)
        if mid.shape[1] != mid.shape[0]:
            raise FlaxvisionError(f"{what}: layer{s}.0.conv2 is a grouped convolution (ResNeXt cardinality); flaxvision's ResNet has none")
        if bottleneck and require(tensors, f"layer{s}.0.conv3.weight", what).shape[0] != 4 * first.shape[0]:
            raise FlaxvisionError(f"{what}: layer{s}'s bottleneck is not 4x narrower than its output (base_width != 64, wide_resnet); not supported")
    if not depths:
        raise FlaxvisionError(f"{what}: no layer1.* tensors; not a timm ResNet")
    has_head = "fc.weight" in tensors
    size = pretrained_cfg.get("input_size") or [3, 224, 224]
    config = ResNetConfig(
        num_classes=int(tensors["fc.weight"].shape[0]) if has_head else 1,
        img_size=int(size[-1]),
        in_chans=int(stem.shape[1]),
        stage_depths=tuple(depths),
        stage_widths=tuple(widths),
        block="bottleneck" if bottleneck else "basic",
        stem_width=None if stem.shape[0] == widths[0] else int(stem.shape[0]),
    )
    labels = cfg.get("label_names") or pretrained_cfg.get("label_names")
    label_names = tuple(str(n) for n in labels) if labels and has_head and len(labels) == config.num_classes else None
    return Parsed(
        format="timm",
        tensors=tensors,
        config=config,
        rules=rules(config, head=has_head),
        has_head=has_head,
        label_names=label_names,
        preprocessing=timm_format.preprocessing({**TIMM_CNN_DEFAULTS, **pretrained_cfg}, config.img_size),
        ignored=counters(tensors),
    )


def architecture_name(config: ResNetConfig) -> str:
    """The timm constructor: resnet18 (basic) or resnet50 (bottleneck); model_args carry the exact depths and widths."""
    if config.block == "bottleneck":
        deeper: dict[tuple[int, ...], str] = {(3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}
        return deeper.get(config.stage_depths, "resnet50")
    return "resnet34" if config.stage_depths == (3, 4, 6, 3) else "resnet18"


def config_files(config: ResNetConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """timm's config.json for these weights (as timm's save_for_hf writes it, with model_args)."""
    reason = refusal(config)
    if reason:
        raise FlaxvisionError(f"{reason}; export it with format='transformers' or 'flaxvision'")
    pretrained_cfg = {
        "input_size": [config.in_chans, config.img_size, config.img_size],
        "interpolation": prep.interpolation,
        "crop_pct": prep.crop_pct,
        "crop_mode": "squash" if prep.resize_mode == "squash" else "center",
        "mean": list(prep.mean),
        "std": list(prep.std),
        "num_classes": config.num_classes,
        "pool_size": [7, 7],
        "first_conv": "conv1",
        "classifier": "fc",
    }
    out: dict[str, Any] = {
        "architecture": architecture_name(config),
        "num_classes": config.num_classes,
        "num_features": config.num_features,
        "global_pool": "avg",
        "model_args": {"layers": list(config.stage_depths), "channels": list(config.stage_widths),
                       "num_classes": config.num_classes, "in_chans": config.in_chans},  # fmt: skip
        "pretrained_cfg": pretrained_cfg,
    }
    if label_names:
        out["label_names"] = list(label_names)
    return {"config.json": out}
