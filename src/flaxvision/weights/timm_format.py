"""timm's VisionTransformer weights (ViT, DeiT, DeiT III, DINOv2, CLIP, SigLIP): model.safetensors + config.json.

config.json as timm's save_for_hf writes it: architecture, model_args (what the creator passed, plus img_size,
in_chans, num_classes, global_pool), pretrained_cfg; Hub configs often have no model_args at all.

Reading takes every option the tensors show from them: cls_token (class_token), dist_token / head_dist (DeiT
distilled: timm's VisionTransformerDistilled), reg_token, the pos_embed length (no_embed_class), ls1.gamma (layer
scale), attn.q_norm / k_norm, norm_pre, patch_embed.proj.bias, attn_pool.* (global_pool "map"), fc_norm, and the
sizes; no head.weight is a backbone (num_classes=0, as DINOv2 and SigLIP are published), given a new head by the
loader. What the tensors cannot say:
  * heads: model_args.num_heads, else q_norm's size, else the architecture name (vit_base_* -> 12), else the
    standard ViT sizes;
  * layer-scale init: model_args.init_values, else 1e-6 for deit3_*, else 1e-5 (every value builds the same
    parameters);
  * LayerNorm eps: timm's CLIP entrypoints (*_clip_*) use LayerNorm(eps=1e-5) through a partial that model_args
    cannot carry, every other ViT eps 1e-6; a norm_layer string in model_args replaces the entrypoint's: 1e-6;
  * activation: model_args.act_layer, else quick_gelu for *_quickgelu*, else exact GELU;
  * global_pool: model_args', else config.json's, else "map" with attn_pool.*, "avg" with fc_norm or without a
    CLS token, else "token" (timm's "", no pooling, counts as unset).
What flaxvision's ViT cannot express is refused, naming the option (gated / SwiGLU MLPs, scale_attn_norm,
scale_mlp_norm, dynamic_img_pad, final_norm=False, proj_bias=False, other pools). dynamic_img_size is ignored: a
flaxvision model has one input size, and the loader resamples the position embedding as timm's
checkpoint_filter_fn does (bicubic, antialiased, prefix positions kept).

Writing: the same files; the architecture name gives timm's class (*_distilled_* for DeiT distilled) and LayerNorm
eps (*_clip_* for 1e-5), model_args every option, so `timm.create_model(config["architecture"], pretrained=False,
**config["model_args"])` + `load_state_dict(strict=True)` rebuilds exactly the model (and `local-dir:DIR` works).

Layout: timm's fused qkv Linear (3D, D) is [q; k; v], heads major: flaxvision's kernel is its transpose.
"""

from __future__ import annotations

import logging
import math
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
    linear,
    require,
    square,
)
from flaxvision.weights.hub import WeightFiles

logger = logging.getLogger(__name__)

FORMAT = "timm"
FAMILY = "VisionTransformer"
# timm's ViT sizes in architecture names: (size, width) -> heads (giant is 1408 wide with 16 heads, DINOv2's 1536/24).
HEADS_BY_NAME = {("tiny", 192): 3, ("xsmall", 256): 4, ("small", 384): 6, ("medium", 512): 8, ("betwixt", 640): 10,
                 ("base", 768): 12, ("large", 1024): 16, ("so400m", 1152): 16, ("huge", 1280): 16, ("giant", 1408): 16,
                 ("giant", 1536): 24, ("gigantic", 1664): 16}  # fmt: skip
_NAME = re.compile(r"^(?:vit|deit3?)_([a-z0-9]+?)_(?:distilled_)?patch(\d+)")
SIZE_BY_WIDTH = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
CLIP_EPS, TIMM_EPS = 1e-5, 1e-6

# Tensors of variants flaxvision cannot express, and the timm option behind each.
UNSUPPORTED_KEYS = (
    (".attn.norm.", "scale_attn_norm"),
    (".mlp.norm.", "scale_mlp_norm"),
    (".mlp.fc1_g.", "a gated (SwiGLU) MLP"),
    ("attn_pool.q_norm.", "qk_norm in the attention pool"),
    ("attn_pool.pos_embed", "a position embedding in the attention pool"),
    ("patch_embed.norm.", "embed_norm_layer (a norm in the patch embedding)"),
)
# model_args that flaxvision reads (from them or from the tensors), ignores (runtime or init only), and the rest
# with the one value it supports.
ARGS_READ = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
             "mlp_ratio", "qkv_bias", "fc_norm", "act_layer", "drop_rate", "pos_drop_rate", "proj_drop_rate",
             "attn_drop_rate", "drop_path_rate", "class_token", "reg_tokens", "no_embed_class", "init_values", "qk_norm",
             "pre_norm", "norm_layer"}  # fmt: skip
ARGS_IGNORED = {"dynamic_img_size", "strict_img_size", "weight_init", "fix_init", "output_fmt", "patch_drop_rate"}
ARGS_FIXED = {"dynamic_img_pad": False, "final_norm": True, "proj_bias": True, "scale_attn_norm": False,
              "scale_mlp_norm": False, "pos_embed": "learn", "pool_include_prefix": False, "embed_norm_layer": None}  # fmt: skip
ACTIVATIONS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
POOLS = ("token", "avg", "map")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
# ViTConfig.options() this layout holds (an option added later is refused on export until it is mapped here).
HELD_OPTIONS = {"qkv_bias", "layer_norm_eps", "act", "global_pool", "fc_norm", "class_token", "distilled", "reg_tokens",
                "no_embed_class", "init_values", "qk_norm", "pre_norm", "patch_bias"}  # fmt: skip


def is_layout(keys: Any) -> bool:
    return any(k.endswith("patch_embed.proj.weight") for k in keys)


def detect(weights: WeightFiles) -> bool:
    # Last of the timm layouts in READERS: it takes every architecture the others did not (and refuses what its
    # VisionTransformer cannot express, naming the option).
    return detect_timm(weights, lambda arch: True, is_layout)


def refusal(config: Any) -> str | None:
    """Why timm's VisionTransformer cannot hold this ViT, or None (also for other families)."""
    if not isinstance(config, ViTConfig):
        return None
    unheld = {k: v for k, v in config.options().items() if k not in HELD_OPTIONS}
    if unheld:
        return f"timm's VisionTransformer layout has no {', '.join(f'{k}={v!r}' for k, v in unheld.items())}"
    if config.global_pool == "token_avg":
        return "timm's VisionTransformer has no global_pool='token_avg' (CLS token and patch mean concatenated)"
    if config.patch_bias == config.pre_norm:
        return (f"timm's VisionTransformer has a patch-projection bias exactly when pre_norm is off; this model has "
                f"pre_norm={config.pre_norm}, patch_bias={config.patch_bias}")  # fmt: skip
    if config.distilled and (config.reg_tokens or config.use_fc_norm):
        return "timm's VisionTransformerDistilled (DeiT distilled) has no register tokens and no fc_norm"
    if config.global_pool == "map" and not config.qkv_bias:
        return "timm's attention pool (AttentionPoolLatent) always has q/kv biases; this model has qkv_bias=False"
    return None


def exports(config: Any) -> bool:
    return isinstance(config, ViTConfig) and refusal(config) is None


def _pair(src: str, dst: str) -> list[Rule]:
    return [copy(f"{src}.weight", f"{dst}.scale"), copy(f"{src}.bias", f"{dst}.bias")]


def _dense(src: str, dst: str, bias: bool = True) -> list[Rule]:
    return [linear(f"{src}.weight", f"{dst}.kernel")] + ([copy(f"{src}.bias", f"{dst}.bias")] if bias else [])


def rules(config: ViTConfig, *, head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a timm VisionTransformer (or VisionTransformerDistilled)."""
    out = [copy(t, t) for t, on in (("cls_token", config.class_token), ("dist_token", config.distilled),
                                     ("reg_token", config.reg_tokens)) if on]  # fmt: skip
    out += [copy("pos_embed", "pos_embed"), conv("patch_embed.proj.weight", "patch_embed.kernel")]
    if config.patch_bias:
        out.append(copy("patch_embed.proj.bias", "patch_embed.bias"))
    if config.pre_norm:
        out += _pair("norm_pre", "norm_pre")
    for i in range(config.depth):
        b = f"blocks.{i}"
        out += _pair(f"{b}.norm1", f"{b}.norm1") + _dense(f"{b}.attn.qkv", f"{b}.attn.qkv", config.qkv_bias)
        if config.qk_norm:
            out += _pair(f"{b}.attn.q_norm", f"{b}.attn.q_norm") + _pair(f"{b}.attn.k_norm", f"{b}.attn.k_norm")
        out += _dense(f"{b}.attn.proj", f"{b}.attn.proj") + _pair(f"{b}.norm2", f"{b}.norm2")
        out += _dense(f"{b}.mlp.fc1", f"{b}.mlp.fc1") + _dense(f"{b}.mlp.fc2", f"{b}.mlp.fc2")
        if config.init_values is not None:
            out += [copy(f"{b}.ls1.gamma", f"{b}.ls1.gamma"), copy(f"{b}.ls2.gamma", f"{b}.ls2.gamma")]
    out += _pair("fc_norm" if config.use_fc_norm else "norm", "norm")  # timm keeps the final norm under its position
    if config.global_pool == "map":
        out.append(copy("attn_pool.latent", "attn_pool.latent"))
        for part in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2"):
            out += _dense(f"attn_pool.{part}", f"attn_pool.{part}")
        out += _pair("attn_pool.norm", "attn_pool.norm")
    if head:
        out += _dense("head", "head") + (_dense("head_dist", "head_dist") if config.distilled else [])
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> timm VisionTransformer state dict."""
    return export(rules(config), params)


def _check_supported(tensors: dict[str, np.ndarray], args: dict[str, Any], what: str) -> None:
    def refuse(option: str, found: str) -> FlaxvisionError:
        return FlaxvisionError(f"{what}: {option} is not supported by flaxvision's ViT ({found})")

    for fragment, option in UNSUPPORTED_KEYS:
        key = next((k for k in tensors if fragment in k or k.startswith(fragment)), None)
        if key is not None:
            raise refuse(option, f"found tensor '{key}'")
    fc1, fc2 = tensors.get("blocks.0.mlp.fc1.weight"), tensors.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.ndim == fc2.ndim == 2 and fc1.shape[0] == 2 * fc2.shape[1]:
        raise refuse("a gated (GLU, packed SwiGLU) MLP", f"blocks.0.mlp.fc1 has {fc1.shape[0]} outputs, fc2 {fc2.shape[1]} inputs")
    if "blocks.0.attn.proj.weight" in tensors and "blocks.0.attn.proj.bias" not in tensors:
        raise refuse("proj_bias=False", "no blocks.0.attn.proj.bias")
    latent = tensors.get("attn_pool.latent")
    if latent is not None and (latent.ndim != 3 or latent.shape[1] != 1):
        raise refuse("an attention pool with several latent queries", f"attn_pool.latent {tuple(latent.shape)}")
    if latent is not None and ("attn_pool.q.bias" in tensors) != ("blocks.0.attn.qkv.bias" in tensors):
        raise refuse("an attention pool whose q/kv biases differ from the blocks' qkv_bias", "attn_pool.q.bias")
    for name, value in args.items():
        if name in ARGS_READ or name in ARGS_IGNORED:
            continue
        if name not in ARGS_FIXED:
            raise FlaxvisionError(f"{what}: timm model argument {name}={value!r} is not supported by flaxvision's ViT")
        if value != ARGS_FIXED[name]:
            raise refuse(f"{name}={value!r}", f"only {ARGS_FIXED[name]!r}")


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


def _grid(pos: np.ndarray, prefix: int, args: dict[str, Any], patch: int, what: str) -> tuple[bool, int]:
    """(no_embed_class, patches per side) from the position embedding's length: with `prefix` CLS / distillation /
    register tokens, timm's table covers prefix + g*g positions, or g*g with no_embed_class."""
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise FlaxvisionError(f"{what}: pos_embed has shape {tuple(pos.shape)}, not (1, tokens, width)")
    n = pos.shape[1]
    readings = [(no_embed, math.isqrt(m)) for no_embed, m in ((False, n - prefix), (True, n))
                if m > 0 and math.isqrt(m) ** 2 == m and (prefix or not no_embed)]  # fmt: skip
    if "img_size" in args and len(readings) > 1:
        grid = square(args["img_size"], "model_args.img_size", what) // patch
        readings = [r for r in readings if r[1] == grid] or readings
    if not readings:
        raise FlaxvisionError(f"{what}: a position embedding of {n} tokens is not a square patch grid, with or without "
                              f"the {prefix} prefix token(s)")  # fmt: skip
    if len(readings) > 1:
        raise FlaxvisionError(f"{what}: a position embedding of {n} tokens fits a {readings[0][1]}x{readings[0][1]} grid "
                              f"plus {prefix} prefix positions and a {readings[1][1]}x{readings[1][1]} grid alone "
                              "(no_embed_class); pass its config.json with model_args.img_size")  # fmt: skip
    return readings[0]


def _num_heads(args: dict[str, Any], tensors: dict[str, np.ndarray], architecture: str, width: int) -> int:
    if args.get("num_heads"):
        return int(args["num_heads"])
    if "blocks.0.attn.q_norm.weight" in tensors:  # q_norm normalises one head
        return width // max(1, require(tensors, "blocks.0.attn.q_norm.weight", "q_norm").shape[0])
    name = _NAME.match(architecture)
    if name and (name.group(1), width) in HEADS_BY_NAME:
        return HEADS_BY_NAME[(name.group(1), width)]
    return default_num_heads(width)


def _layer_norm_eps(args: dict[str, Any], architecture: str, what: str) -> float:
    if "norm_layer" not in args:
        return CLIP_EPS if "_clip_" in architecture else TIMM_EPS
    norm = args["norm_layer"]
    if norm is None or (isinstance(norm, str) and norm.replace("_", "").lower() in ("", "layernorm", "layernormfp32")):
        return TIMM_EPS  # replaces the entrypoint's norm_layer: timm's LayerNorm, eps 1e-6
    raise FlaxvisionError(f"{what}: norm_layer={norm!r} is not supported by flaxvision's ViT (LayerNorm only)")


def _global_pool(cfg: dict[str, Any], args: dict[str, Any], tensors: dict[str, np.ndarray], what: str) -> str:
    pool = args.get("global_pool", cfg.get("global_pool")) or None
    if pool is None:  # unset, or timm's "" (no pooling): what the tensors say
        pool = "map" if "attn_pool.latent" in tensors else "avg" if "fc_norm.weight" in tensors or "cls_token" not in tensors else "token"
    if pool not in POOLS:
        raise FlaxvisionError(f"{what}: global_pool={pool!r} is not supported; flaxvision ViTs pool 'token', 'avg' or 'map'")
    return pool


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of timm ViT weights."""
    what = f"timm weights '{weights.origin}'"
    cfg = weights.config or {}
    args = dict(cfg.get("model_args") or {})
    pretrained_cfg = cfg.get("pretrained_cfg") or ({k: v for k, v in cfg.items() if k != "architecture"} if "mean" in cfg else {})
    tensors = weights.tensors
    _check_supported(tensors, args, what)

    kernel = require(tensors, "patch_embed.proj.weight", what, 4)  # (D, C, p, p)
    if kernel.shape[2] != kernel.shape[3]:
        raise FlaxvisionError(f"{what}: patch_embed.proj.weight {tuple(kernel.shape)} is not a square-patch convolution")
    width, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    if "norm.weight" not in tensors and "fc_norm.weight" not in tensors:
        raise FlaxvisionError(f"{what}: final_norm=False (no norm.weight or fc_norm.weight) is not supported by flaxvision's ViT")
    class_token, distilled = "cls_token" in tensors, "dist_token" in tensors
    reg_tokens = int(require(tensors, "reg_token", what, 3).shape[1]) if "reg_token" in tensors else 0
    no_embed_class, grid = _grid(require(tensors, "pos_embed", what, 3), int(class_token) + int(distilled) + reg_tokens, args, patch, what)
    architecture = str(cfg.get("architecture", ""))
    act_layer = args.get("act_layer", "quick_gelu" if "quickgelu" in architecture else None)
    if act_layer not in ACTIVATIONS:
        raise FlaxvisionError(f"{what}: act_layer={act_layer!r} is not supported; flaxvision ViTs use gelu, gelu_tanh, quick_gelu, relu")
    layer_scale = "blocks.0.ls1.gamma" in tensors
    global_pool = _global_pool(cfg, args, tensors, what)
    has_head, has_fc_norm = "head.weight" in tensors, "fc_norm.weight" in tensors
    num_classes = require(tensors, "head.weight", what, 2).shape[0] if has_head else 1
    try:
        config = ViTConfig(
            num_classes=num_classes,
            img_size=grid * patch,
            patch_size=patch,
            in_chans=in_chans,
            width=width,
            depth=block_count(tensors, "blocks."),
            num_heads=_num_heads(args, tensors, architecture, width),
            mlp_dim=require(tensors, "blocks.0.mlp.fc1.weight", what, 2).shape[0],
            qkv_bias="blocks.0.attn.qkv.bias" in tensors,
            layer_norm_eps=_layer_norm_eps(args, architecture, what),
            act=ACTIVATIONS[act_layer],
            dropout_rate=float(args.get("proj_drop_rate", args.get("drop_rate", 0.0))),
            attention_dropout_rate=float(args.get("attn_drop_rate", 0.0)),
            drop_path_rate=float(args.get("drop_path_rate", 0.0)),
            global_pool=global_pool,
            fc_norm=None if has_fc_norm == (global_pool == "avg") else has_fc_norm,  # None: timm's default rule
            class_token=class_token,
            distilled=distilled,
            reg_tokens=reg_tokens,
            no_embed_class=no_embed_class,
            init_values=(args.get("init_values") or (1e-6 if architecture.startswith("deit3") else 1e-5)) if layer_scale else None,
            qk_norm="blocks.0.attn.q_norm.weight" in tensors,
            pre_norm="norm_pre.weight" in tensors,
            patch_bias="patch_embed.proj.bias" in tensors,
        )
    except FlaxvisionError as err:  # the combination is not a ViT flaxvision builds (e.g. token pooling, no CLS)
        raise FlaxvisionError(f"{what}: {err}") from None
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
    """A timm architecture of the right class and LayerNorm eps for the config (model_args carry the rest)."""
    size = SIZE_BY_WIDTH.get(config.width, "base")
    if config.distilled:  # VisionTransformerDistilled
        return f"deit_{size if size != 'large' else 'base'}_distilled_patch16_224"
    if config.layer_norm_eps == CLIP_EPS:  # LayerNorm(eps=1e-5)
        return "vit_large_patch14_clip_224" if (size, config.patch_size) == ("large", 14) else "vit_base_patch16_clip_224"
    if config.reg_tokens:
        return f"vit_{size if size != 'tiny' else 'small'}_patch14_reg4_dinov2"
    if config.init_values is not None:
        small = size if size != "tiny" else "small"
        return f"deit3_{small}_patch16_224" if config.no_embed_class else f"vit_{small}_patch14_dinov2"
    if config.global_pool == "map":
        return "vit_large_patch16_siglip_256" if size == "large" else "vit_base_patch16_siglip_224"
    if config.patch_size not in (16, 32):
        return "vit_base_patch16_224"
    stem = f"vit_{'small' if (size, config.patch_size) == ('tiny', 32) else size}_patch{config.patch_size}"  # no tiny/32
    return f"{stem}_{384 if config.img_size == 384 else 224}"


def model_args(config: ViTConfig) -> dict[str, Any]:
    """timm VisionTransformer keyword arguments that rebuild exactly this architecture (every option explicit, so
    that no default of the architecture named beside them matters but its class and LayerNorm eps)."""
    ratio = config.mlp_dim / config.width
    while int(config.width * ratio) < config.mlp_dim:  # timm computes int(embed_dim * mlp_ratio)
        ratio = float(np.nextafter(ratio, np.inf))
    fields = {"img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "num_classes": "num_classes",
              "global_pool": "global_pool", "embed_dim": "width", "depth": "depth", "num_heads": "num_heads",
              "qkv_bias": "qkv_bias", "class_token": "class_token", "reg_tokens": "reg_tokens",
              "no_embed_class": "no_embed_class", "init_values": "init_values", "qk_norm": "qk_norm",
              "pre_norm": "pre_norm", "fc_norm": "use_fc_norm", "act_layer": "act"}  # fmt: skip
    return {"mlp_ratio": ratio} | {arg: getattr(config, field) for arg, field in fields.items()}


def config_files(config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """timm's config.json for these weights (as timm's save_for_hf writes it)."""
    architecture = architecture_name(config)
    eps = CLIP_EPS if "_clip_" in architecture else TIMM_EPS
    if config.layer_norm_eps != eps:
        logger.warning(
            "timm's %s uses LayerNorm eps %g, this model %g: timm's outputs will differ slightly "
            "(format='flaxvision' keeps the eps)", architecture, eps, config.layer_norm_eps
        )  # fmt: skip
    pretrained_cfg = {
        "custom_load": False, "input_size": [config.in_chans, config.img_size, config.img_size], "fixed_input_size": True,
        "interpolation": prep.interpolation, "crop_pct": prep.crop_pct,
        "crop_mode": "squash" if prep.resize_mode == "squash" else "center", "mean": list(prep.mean),
        "std": list(prep.std), "num_classes": config.num_classes, "pool_size": None, "first_conv": "patch_embed.proj",
        "classifier": ["head", "head_dist"] if config.distilled else "head",
    }  # fmt: skip
    out = {
        "architecture": architecture,
        "num_classes": config.num_classes,
        "num_features": config.width,
        "global_pool": config.global_pool,
        "model_args": model_args(config),
        "pretrained_cfg": pretrained_cfg,
    }
    if label_names:
        out["label_names"] = list(label_names)
    return {"config.json": out}
