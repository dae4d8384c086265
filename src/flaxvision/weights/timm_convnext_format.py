"""timm's ConvNeXt weights (convnext_tiny / small / base ..., e.g. `timm/convnext_tiny.in12k_ft_in1k`).

Layout: stem.0 (4x4 conv), stem.1 (LayerNorm2d); stages.{s}.downsample.0 (LayerNorm2d) / .1 (2x2 conv) for s > 0;
stages.{s}.blocks.{i}.conv_dw, norm, mlp.fc1, mlp.fc2, gamma; head.norm, head.fc. Reading: dims and depths from
the tensors, layer scale from gamma's presence, the preprocessing from pretrained_cfg (else timm's
in12k_ft_in1k defaults: ImageNet mean/std, crop_pct 0.95, bicubic). ConvNeXt-V2 (GRN), conv_mlp, head_norm_first,
other kernel or patch sizes are refused, naming the option. Writing: the same files, loadable by
`timm.create_model(architecture, pretrained=False, **model_args)` + `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

import flaxvision.weights.timm_format as timm_format
from flaxvision.errors import FlaxvisionError
from flaxvision.models.convnext import KERNEL, NORM_EPS, ConvNeXtConfig
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.cnn_layouts import TIMM_CNN_DEFAULTS, layer_norm, require, stage_count
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
FAMILY = "ConvNeXt"
NAMES: dict[tuple[tuple[int, ...], tuple[int, ...]], str] = {((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny", ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
         ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base", ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large"}  # fmt: skip
ARGS_READ = {"depths", "dims", "num_classes", "in_chans", "ls_init_value", "drop_path_rate", "norm_eps"}
ARGS_IGNORED = {"drop_rate", "head_init_scale"}
ARGS_FIXED = {"global_pool": "avg", "output_stride": 32, "kernel_sizes": KERNEL, "stem_type": "patch", "patch_size": 4,
              "head_norm_first": False, "head_hidden_size": None, "conv_mlp": False, "conv_bias": True, "use_grn": False,
              "act_layer": "gelu", "norm_layer": None}  # fmt: skip
UNSUPPORTED_KEYS = ((".mlp.grn.", "use_grn (ConvNeXt-V2)"), ("norm_pre.", "head_norm_first"), ("head.pre_logits.", "head_hidden_size"))


def is_layout(keys: Any) -> bool:
    keys = set(keys)
    return "stem.0.weight" in keys and "stages.0.blocks.0.conv_dw.weight" in keys


def detect(weights: WeightFiles) -> bool:
    return detect_timm(weights, lambda arch: arch.startswith("convnext"), is_layout)


def exports(config: Any) -> bool:
    return isinstance(config, ConvNeXtConfig)


def rules(config: ConvNeXtConfig, *, head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a timm ConvNeXt."""
    out = [conv("stem.0.weight", "stem_conv.kernel"), copy("stem.0.bias", "stem_conv.bias"), *layer_norm("stem.1", "stem_norm")]
    for s, depth in enumerate(config.depths):
        src, dst = f"stages.{s}.", f"stages.{s}."
        if s > 0:
            out += [*layer_norm(f"{src}downsample.0", f"{dst}downsample_norm"), conv(f"{src}downsample.1.weight", f"{dst}downsample_conv.kernel"),
                    copy(f"{src}downsample.1.bias", f"{dst}downsample_conv.bias")]  # fmt: skip
        for i in range(depth):
            b, f = f"{src}blocks.{i}.", f"{dst}blocks.{i}."
            out += [conv(f"{b}conv_dw.weight", f"{f}conv_dw.kernel"), copy(f"{b}conv_dw.bias", f"{f}conv_dw.bias"), *layer_norm(f"{b}norm", f"{f}norm"),
                    linear(f"{b}mlp.fc1.weight", f"{f}fc1.kernel"), copy(f"{b}mlp.fc1.bias", f"{f}fc1.bias"),
                    linear(f"{b}mlp.fc2.weight", f"{f}fc2.kernel"), copy(f"{b}mlp.fc2.bias", f"{f}fc2.bias")]  # fmt: skip
            if config.layer_scale > 0:
                out.append(copy(f"{b}gamma", f"{f}gamma"))
    out += layer_norm("head.norm", "norm")
    if head:
        out += [linear("head.fc.weight", "head.kernel"), copy("head.fc.bias", "head.bias")]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ConvNeXtConfig) -> dict[str, np.ndarray]:
    return export(rules(config), params)


def _check_supported(tensors: dict[str, np.ndarray], args: dict[str, Any], what: str) -> None:
    check_supported(tensors, args, what, "ConvNeXt", unsupported_keys=UNSUPPORTED_KEYS, read=ARGS_READ, ignored=ARGS_IGNORED,
                    fixed=ARGS_FIXED, same=lambda value, only: value == only or (isinstance(value, list) and set(value) == {only}))
    if args.get("norm_eps") not in (None, NORM_EPS):
        raise FlaxvisionError(f"{what}: norm_eps={args['norm_eps']!r} is not supported by flaxvision's ConvNeXt (only {NORM_EPS})")


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of timm ConvNeXt weights."""
    what = f"timm weights '{weights.origin}'"
    cfg = weights.config or {}
    args = dict(cfg.get("model_args") or {})
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    tensors = weights.tensors
    _check_supported(tensors, args, what)
    stem = require(tensors, "stem.0.weight", what)  # (D0, C, 4, 4)
    if tuple(stem.shape[2:]) != (4, 4):
        raise FlaxvisionError(f"{what}: stem.0.weight {tuple(stem.shape)} is not a 4x4 patchify stem; flaxvision's ConvNeXt has one")
    depths, dims = [], []
    for s in range(stage_count(tensors, "stages.{}.")):
        depths.append(block_count(tensors, f"stages.{s}.blocks."))
        dw = require(tensors, f"stages.{s}.blocks.0.conv_dw.weight", what)
        if tuple(dw.shape[1:]) != (1, KERNEL, KERNEL):
            raise FlaxvisionError(f"{what}: stages.{s}.blocks.0.conv_dw.weight {tuple(dw.shape)} is not a {KERNEL}x{KERNEL} depthwise kernel")
        if require(tensors, f"stages.{s}.blocks.0.mlp.fc1.weight", what).ndim != 2:
            raise FlaxvisionError(f"{what}: conv_mlp=True (1x1 convolutions for the MLP) is not supported by flaxvision's ConvNeXt")
        dims.append(int(dw.shape[0]))
    has_head = "head.fc.weight" in tensors
    size = pretrained_cfg.get("input_size") or [3, 224, 224]
    config = ConvNeXtConfig(
        num_classes=int(tensors["head.fc.weight"].shape[0]) if has_head else 1,
        img_size=int(size[-1]),
        in_chans=int(stem.shape[1]),
        depths=tuple(depths),
        dims=tuple(dims),
        layer_scale=1e-6 if "stages.0.blocks.0.gamma" in tensors else 0.0,
        layer_norm_eps=NORM_EPS,
        drop_path_rate=float(args.get("drop_path_rate", 0.0)),
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
    )


def config_files(config: ConvNeXtConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """timm's config.json for these weights (as timm's save_for_hf writes it, with model_args)."""
    if config.layer_norm_eps != NORM_EPS:
        logger.warning(
            "timm's ConvNeXt uses LayerNorm eps %g in its head, this model %g: timm's outputs will differ slightly "
            "(format='transformers' or 'flaxvision' keep the eps)", NORM_EPS, config.layer_norm_eps,
        )  # fmt: skip
    pretrained_cfg = {
        "input_size": [config.in_chans, config.img_size, config.img_size],
        "interpolation": prep.interpolation,
        "crop_pct": prep.crop_pct,
        "crop_mode": "squash" if prep.resize_mode == "squash" else "center",
        "mean": list(prep.mean),
        "std": list(prep.std),
        "num_classes": config.num_classes,
        "pool_size": [7, 7],
        "first_conv": "stem.0",
        "classifier": "head.fc",
    }
    out: dict[str, Any] = {
        "architecture": NAMES.get((config.depths, config.dims), "convnext_tiny"),
        "num_classes": config.num_classes,
        "num_features": config.dims[-1],
        "global_pool": "avg",
        "model_args": {"depths": list(config.depths), "dims": list(config.dims), "num_classes": config.num_classes,
                       "in_chans": config.in_chans, "ls_init_value": config.layer_scale or None},  # fmt: skip
        "pretrained_cfg": pretrained_cfg,
    }
    if label_names:
        out["label_names"] = list(label_names)
    return {"config.json": out}
