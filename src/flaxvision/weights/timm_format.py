"""timm's VisionTransformer weights: model.safetensors + config.json (architecture, model_args, pretrained_cfg).

Reading: tensor shapes give width, depth, MLP size, patch size and the trained image size; the head count comes
from `model_args.num_heads`, else the architecture name (vit_base_* -> 12), else the standard ViT sizes; the
preprocessing from pretrained_cfg (mean, std, interpolation, crop_pct, crop_mode), else timm's ViT defaults
(mean = std = 0.5, bicubic, crop_pct 0.9). Variants flaxvision cannot express (register tokens, layer scale,
qk-norm, no class token, pre-norm, attention pooling ...) are refused, naming the field.
Writing: the same files, loadable by `timm.create_model("local-dir:DIR", pretrained=True)` or, with the names
from config.json, `timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(
file="DIR/model.safetensors", num_classes=N), **model_args)` (without num_classes in the overlay, timm drops the
head when N differs from the architecture's default pretrained_cfg).

Layout: timm's fused qkv Linear (3D, D) is [q; k; v], heads major: flaxvision's kernel is its transpose.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.models.vit import ViTConfig
from flaxvision.preprocessing import HALF, Preprocessing
from flaxvision.weights.convert import (
    Parsed,
    Rule,
    block_count,
    conv,
    copy,
    default_num_heads,
    detect_timm,
    export,
    grid_of,
    import_params,
    linear,
)
from flaxvision.weights.hub import WeightFiles

logger = logging.getLogger(__name__)

FORMAT = "timm"
FAMILY = "VisionTransformer"
HEADS_BY_SIZE = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}
_NAME = re.compile(r"^(?:vit|deit)_(tiny|small|medium|base|large|huge|giant|gigantic)_patch(\d+)_")
# timm architecture names for the registered sizes, used as the constructor name when exporting.
TIMM_NAMES = {
    ("tiny", 16): "vit_tiny_patch16", ("small", 16): "vit_small_patch16", ("small", 32): "vit_small_patch32",
    ("base", 16): "vit_base_patch16", ("base", 32): "vit_base_patch32", ("large", 16): "vit_large_patch16",
    ("large", 32): "vit_large_patch32",
}  # fmt: skip
SIZES = {(192, 12, 3, 768): "tiny", (384, 12, 6, 1536): "small", (768, 12, 12, 3072): "base", (1024, 24, 16, 4096): "large"}

# Tensors that only exist in variants flaxvision cannot express, and the timm option behind each.
UNSUPPORTED_KEYS = (
    ("reg_token", "reg_tokens (register tokens)"),
    ("dist_token", "distillation token (deit *_distilled_*)"),
    (".ls1.", "init_values (layer scale)"),
    (".attn.q_norm.", "qk_norm"),
    (".attn.norm.", "scale_attn_norm"),
    (".mlp.norm.", "scale_mlp_norm"),
    ("norm_pre.", "pre_norm"),
    ("attn_pool.", "global_pool='map' (attention pooling)"),
    (".mlp.fc1_g.", "a gated (GLU) MLP"),
)
# model_args flaxvision follows, and for the rest the one value it supports.
ARGS_READ = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
             "mlp_ratio", "qkv_bias", "fc_norm", "act_layer", "drop_rate", "pos_drop_rate", "proj_drop_rate",
             "attn_drop_rate", "drop_path_rate"}  # fmt: skip
ARGS_IGNORED = {"dynamic_img_size", "strict_img_size", "weight_init", "output_fmt", "patch_drop_rate"}
ARGS_FIXED = {"class_token": True, "no_embed_class": False, "reg_tokens": 0, "init_values": None, "qk_norm": False,
              "pre_norm": False, "final_norm": True, "dynamic_img_pad": False, "proj_bias": True, "norm_layer": None}  # fmt: skip
ACTIVATIONS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def is_layout(keys: Any) -> bool:
    return any(k.endswith("patch_embed.proj.weight") for k in keys)


def detect(weights: WeightFiles) -> bool:
    # Last of the timm layouts in READERS: it takes every architecture the others did not (and refuses what its
    # VisionTransformer cannot express, naming the option).
    return detect_timm(weights, lambda arch: True, is_layout)


def exports(config: Any) -> bool:
    return isinstance(config, ViTConfig)


def rules(config: ViTConfig, *, head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a timm VisionTransformer."""
    out = [
        copy("cls_token", "cls_token"),
        copy("pos_embed", "pos_embed"),
        conv("patch_embed.proj.weight", "patch_embed.kernel"),
        copy("patch_embed.proj.bias", "patch_embed.bias"),
    ]
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        out += [
            copy(f"{src}norm1.weight", f"{dst}norm1.scale"),
            copy(f"{src}norm1.bias", f"{dst}norm1.bias"),
            linear(f"{src}attn.qkv.weight", f"{dst}attn.qkv.kernel"),
        ]
        if config.qkv_bias:
            out.append(copy(f"{src}attn.qkv.bias", f"{dst}attn.qkv.bias"))
        out += [
            linear(f"{src}attn.proj.weight", f"{dst}attn.proj.kernel"),
            copy(f"{src}attn.proj.bias", f"{dst}attn.proj.bias"),
            copy(f"{src}norm2.weight", f"{dst}norm2.scale"),
            copy(f"{src}norm2.bias", f"{dst}norm2.bias"),
            linear(f"{src}mlp.fc1.weight", f"{dst}mlp.fc1.kernel"),
            copy(f"{src}mlp.fc1.bias", f"{dst}mlp.fc1.bias"),
            linear(f"{src}mlp.fc2.weight", f"{dst}mlp.fc2.kernel"),
            copy(f"{src}mlp.fc2.bias", f"{dst}mlp.fc2.bias"),
        ]
    norm = "fc_norm" if config.use_fc_norm else "norm"  # timm keeps the final norm's weights under its position
    out += [copy(f"{norm}.weight", "norm.scale"), copy(f"{norm}.bias", "norm.bias")]
    if head:
        out += [linear("head.weight", "head.kernel"), copy("head.bias", "head.bias")]
    return out


def to_flaxvision(tensors: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """Their tensor dict -> flaxvision flat dict."""
    return import_params(rules(config, head="head.weight" in tensors), tensors)


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> timm VisionTransformer state dict."""
    return export(rules(config), params)


def _check_supported(tensors: dict[str, np.ndarray], args: dict[str, Any], what: str) -> None:
    for fragment, option in UNSUPPORTED_KEYS:
        key = next((k for k in tensors if fragment in k or k.startswith(fragment)), None)
        if key is not None:
            raise FlaxvisionError(f"{what}: {option} is not supported by flaxvision's ViT (found tensor '{key}')")
    if "cls_token" not in tensors and "patch_embed.proj.weight" in tensors:
        raise FlaxvisionError(f"{what}: class_token=False (no CLS token) is not supported by flaxvision's ViT")
    for name, value in args.items():
        if name in ARGS_READ or name in ARGS_IGNORED:
            continue
        if name not in ARGS_FIXED:
            raise FlaxvisionError(f"{what}: timm model argument {name}={value!r} is not supported by flaxvision's ViT")
        if value != ARGS_FIXED[name] and not (name == "norm_layer" and value in ("layernorm", "LayerNorm")):
            raise FlaxvisionError(
                f"{what}: {name}={value!r} is not supported by flaxvision's ViT (only {ARGS_FIXED[name]!r})"
            )


def preprocessing(pretrained_cfg: dict[str, Any] | None, img_size: int) -> Preprocessing:
    """Preprocessing from timm's pretrained_cfg, or timm's ViT defaults."""
    cfg = pretrained_cfg or {}
    interpolation = cfg.get("interpolation", "bicubic")
    crop_mode = cfg.get("crop_mode", "center")
    return Preprocessing(
        img_size=img_size,
        mean=tuple(cfg.get("mean", HALF)),
        std=tuple(cfg.get("std", HALF)),
        crop_pct=min(1.0, float(cfg.get("crop_pct", 0.9))),
        resize_mode="squash" if crop_mode == "squash" else "shortest",
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
    )


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of timm ViT weights."""
    what = f"timm weights '{weights.origin}'"
    cfg = weights.config or {}
    args = dict(cfg.get("model_args") or {})
    pretrained_cfg = cfg.get("pretrained_cfg") or ({k: v for k, v in cfg.items() if k != "architecture"} if "mean" in cfg else {})
    tensors = weights.tensors
    _check_supported(tensors, args, what)
    if args.get("class_token") is False or "cls_token" not in tensors:
        raise FlaxvisionError(f"{what}: class_token=False (no CLS token) is not supported by flaxvision's ViT")

    def get(key: str) -> np.ndarray:
        if key not in tensors:
            raise FlaxvisionError(f"{what}: cannot infer the architecture without '{key}'")
        return tensors[key]

    kernel = get("patch_embed.proj.weight")  # (D, C, p, p)
    width, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    if kernel.shape[2] != kernel.shape[3]:
        raise FlaxvisionError(f"{what}: non-square patches {kernel.shape[2:]} are not supported")
    pos = get("pos_embed")
    if round(pos.shape[1] ** 0.5) ** 2 == pos.shape[1]:
        raise FlaxvisionError(f"{what}: no_embed_class=True (no position for the CLS token) is not supported by flaxvision's ViT")
    architecture = str(cfg.get("architecture", ""))
    name = _NAME.match(architecture)
    heads = args.get("num_heads") or (HEADS_BY_SIZE[name.group(1)] if name else default_num_heads(width))
    act_layer = args.get("act_layer", "quick_gelu" if "quickgelu" in architecture else None)
    if act_layer not in ACTIVATIONS:
        raise FlaxvisionError(f"{what}: act_layer={act_layer!r} is not supported; flaxvision ViTs use gelu, gelu_tanh, quick_gelu, relu")
    global_pool = cfg.get("global_pool", args.get("global_pool", "avg" if "fc_norm.weight" in tensors else "token"))
    if global_pool not in ("token", "avg"):
        raise FlaxvisionError(f"{what}: global_pool={global_pool!r} is not supported; flaxvision ViTs pool 'token' or 'avg'")
    has_head, has_fc_norm = "head.weight" in tensors, "fc_norm.weight" in tensors
    num_classes = tensors["head.weight"].shape[0] if has_head else 1
    config = ViTConfig(
        num_classes=num_classes,
        img_size=grid_of(pos, 1, what) * patch,
        patch_size=patch,
        in_chans=in_chans,
        width=width,
        depth=block_count(tensors, "blocks."),
        num_heads=heads,
        mlp_dim=get("blocks.0.mlp.fc1.weight").shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in tensors,
        layer_norm_eps=1e-6,
        act=ACTIVATIONS[act_layer],
        dropout_rate=float(args.get("proj_drop_rate", args.get("drop_rate", 0.0))),
        attention_dropout_rate=float(args.get("attn_drop_rate", 0.0)),
        drop_path_rate=float(args.get("drop_path_rate", 0.0)),
        global_pool=global_pool,
        fc_norm=None if has_fc_norm == (global_pool == "avg") else has_fc_norm,  # None: timm's default rule
    )
    labels = cfg.get("label_names") or pretrained_cfg.get("label_names")
    label_names = tuple(str(n) for n in labels) if labels and len(labels) == num_classes and has_head else None
    return Parsed(
        format="timm",
        tensors=weights.tensors,
        config=config,
        rules=rules(config, head=has_head),
        has_head=has_head,
        label_names=label_names,
        preprocessing=preprocessing(pretrained_cfg or None, config.img_size),
    )


def architecture_name(config: ViTConfig) -> str:
    """A timm architecture name for the config (the constructor timm uses; model_args carry the exact sizes)."""
    size = SIZES.get((config.width, config.depth, config.num_heads, config.mlp_dim))
    stem = TIMM_NAMES.get((size, config.patch_size), "vit_base_patch16") if size is not None else "vit_base_patch16"
    return f"{stem}_{384 if config.img_size == 384 else 224}"


def model_args(config: ViTConfig) -> dict[str, Any]:
    """timm VisionTransformer keyword arguments that rebuild exactly this architecture."""
    ratio = config.mlp_dim / config.width
    while int(config.width * ratio) < config.mlp_dim:  # timm computes int(embed_dim * mlp_ratio)
        ratio = float(np.nextafter(ratio, np.inf))
    args: dict[str, Any] = {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "num_classes": config.num_classes,
        "global_pool": config.global_pool,
        "embed_dim": config.width,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": ratio,
        "qkv_bias": config.qkv_bias,
        "fc_norm": config.use_fc_norm,
    }
    if config.act != "gelu":
        args["act_layer"] = config.act
    return args


def config_files(config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """timm's config.json for these weights (as timm's save_for_hf writes it)."""
    if config.layer_norm_eps != 1e-6:
        logger.warning(
            "timm's VisionTransformer uses LayerNorm eps 1e-6, this model %g: timm's outputs will differ slightly "
            "(format='transformers' or 'flaxvision' keep the eps)", config.layer_norm_eps
        )
    pretrained_cfg = {
        "custom_load": False,
        "input_size": [config.in_chans, config.img_size, config.img_size],
        "fixed_input_size": True,
        "interpolation": prep.interpolation,
        "crop_pct": prep.crop_pct,
        "crop_mode": "squash" if prep.resize_mode == "squash" else "center",
        "mean": list(prep.mean),
        "std": list(prep.std),
        "num_classes": config.num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    out = {
        "architecture": architecture_name(config),
        "num_classes": config.num_classes,
        "num_features": config.width,
        "global_pool": config.global_pool,
        "model_args": model_args(config),
        "pretrained_cfg": pretrained_cfg,
    }
    if label_names:
        out["label_names"] = list(label_names)
    return {"config.json": out}
