"""transformers' ViT weights (ViTForImageClassification, ViTModel): config.json + model.safetensors.

Reading: the architecture comes from config.json (hidden_size, num_hidden_layers, num_attention_heads,
intermediate_size, patch_size, image_size, num_channels, layer_norm_eps, qkv_bias, hidden_act, id2label) and the
preprocessing from preprocessor_config.json, else ViTImageProcessor's defaults (224 x 224 squash, bilinear,
mean = std = 0.5). A bare model.safetensors is read from its tensor shapes, with transformers' defaults for what
shapes cannot tell (layer_norm_eps 1e-12, exact GELU, standard head counts).
Writing: the same files, loadable by `ViTForImageClassification.from_pretrained(dir)`.

Layout: files name layers `encoder.layer.{i}.attention.attention.query` etc. (also what transformers v5's
save_pretrained writes); v5's modules are named `layers.{i}.attention.q_proj` etc., which a plain
`torch.save(model.state_dict())` stores: both are read. q, k and v are separate Linear layers here; flaxvision
fuses them into one (D, 3D) kernel [q | k | v], heads major, which is also the order transformers splits heads in,
so fusing is a concatenation.
"""

from __future__ import annotations

import dataclasses
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
    detect_transformers,
    export,
    fused,
    grid_of,
    import_params,
    linear,
    require,
    square,
)
from flaxvision.weights.hub import WeightFiles

logger = logging.getLogger(__name__)

FORMAT = "transformers"
FAMILY = "ViT (model_type 'vit')"
STEM_KERNEL = "patch_embed.kernel"  # the input conv (1-channel models: tiled to RGB on export, gray_stem)
MODEL_TYPES = ("vit",)
# transformers hidden_act -> flaxvision act. gelu_new / gelu_pytorch_tanh / gelu_fast are all the tanh form.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "quick_gelu": "quick_gelu", "relu": "relu"}  # fmt: skip
ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values
POOLER = ("pooler.dense.weight", "pooler.dense.bias")  # ViTModel's tanh pooler: not part of a classifier
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def is_layout(keys: Any) -> bool:
    # DeiT's distillation token and DINOv2's layer scale mark their files (their modules read them).
    keys = tuple(keys)
    other = any(k.endswith(("embeddings.distillation_token", "layer_scale1.lambda1")) for k in keys)
    return not other and any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys)


def detect(weights: WeightFiles) -> bool:
    # Without a config.json, any transformers ViT-like file is read here (and refused with a reason if it cannot be).
    return detect_transformers(weights, MODEL_TYPES, is_layout)


def exports(config: Any) -> bool:
    """ViTForImageClassification: a plain ViT with a CLS-token head (the other options belong to other classes)."""
    return isinstance(config, ViTConfig) and not extra_options(config)


def refusal(config: Any) -> str | None:
    if isinstance(config, ViTConfig) and family_of(config) == "vit" and extra_options(config):
        return f"transformers' ViTForImageClassification has a CLS-token head only (a plain ViT), this model has {', '.join(extra_options(config))}"
    return None


def extra_options(config: ViTConfig) -> list[str]:
    """The options of `config` that a plain ViTForImageClassification lacks (its non-default token, pooling, norm
    and patch options), as `name=value`."""
    plain = ViTConfig()
    names = ("class_token", "distilled", "reg_tokens", "no_embed_class", "init_values", "qk_norm", "pre_norm", "patch_bias", "global_pool")
    out = [f"{n}={getattr(config, n)!r}" for n in names if getattr(config, n) != getattr(plain, n)]
    return out + (["fc_norm=True"] if config.use_fc_norm else [])


def family_of(config: ViTConfig) -> str:
    """Which transformers layout a ViT config belongs to, by the option that marks it ("vit" when none does): the
    family whose `refusal` explains what its classes lack when no transformers class can hold the config."""
    if config.distilled or config.reg_tokens:
        return "deit"
    if config.init_values is not None or config.global_pool == "token_avg":
        return "dinov2"
    if not config.class_token or config.global_pool == "map":
        return "siglip"
    if config.pre_norm or not config.patch_bias:
        return "clip"
    return "vit"


# Per-layer names: weight files (the Hub, save_pretrained) and transformers v5's module names
# (what torch.save(model.state_dict()) writes since v5 renamed the modules).
FILE_NAMES = dict(layer="encoder.layer.{}.", q="attention.attention.query", k="attention.attention.key",
                  v="attention.attention.value", o="attention.output.dense", fc1="intermediate.dense", fc2="output.dense")  # fmt: skip
MODULE_NAMES = dict(layer="layers.{}.", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                    o="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip


def naming_of(keys: Any, prefix: str) -> dict[str, str]:
    return MODULE_NAMES if any(k.startswith(f"{prefix}layers.") for k in keys) else FILE_NAMES


def rules(config: ViTConfig, *, prefix: str = "vit.", head: bool = True, names: dict[str, str] = FILE_NAMES) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a ViT; `prefix` is "vit." (classifier) or "" (ViTModel)."""
    p = prefix
    out = [
        copy(f"{p}embeddings.cls_token", "cls_token"),
        copy(f"{p}embeddings.position_embeddings", "pos_embed"),
        conv(f"{p}embeddings.patch_embeddings.projection.weight", "patch_embed.kernel"),
        copy(f"{p}embeddings.patch_embeddings.projection.bias", "patch_embed.bias"),
    ]
    for i in range(config.depth):
        src, dst = p + names["layer"].format(i), f"blocks.{i}."
        qkv = [src + names[n] for n in ("q", "k", "v")]
        out += [
            copy(f"{src}layernorm_before.weight", f"{dst}norm1.scale"),
            copy(f"{src}layernorm_before.bias", f"{dst}norm1.bias"),
            fused(tuple(f"{k}.weight" for k in qkv), f"{dst}attn.qkv.kernel", lambda w: w.T, lambda k: k.T, axis=1),
        ]
        if config.qkv_bias:
            out.append(fused(tuple(f"{k}.bias" for k in qkv), f"{dst}attn.qkv.bias", lambda b: b, lambda b: b, axis=0))
        out += [
            linear(f"{src}{names['o']}.weight", f"{dst}attn.proj.kernel"),
            copy(f"{src}{names['o']}.bias", f"{dst}attn.proj.bias"),
            copy(f"{src}layernorm_after.weight", f"{dst}norm2.scale"),
            copy(f"{src}layernorm_after.bias", f"{dst}norm2.bias"),
            linear(f"{src}{names['fc1']}.weight", f"{dst}mlp.fc1.kernel"),
            copy(f"{src}{names['fc1']}.bias", f"{dst}mlp.fc1.bias"),
            linear(f"{src}{names['fc2']}.weight", f"{dst}mlp.fc2.kernel"),
            copy(f"{src}{names['fc2']}.bias", f"{dst}mlp.fc2.bias"),
        ]
    out += [copy(f"{p}layernorm.weight", "norm.scale"), copy(f"{p}layernorm.bias", "norm.bias")]
    if head:
        out += [linear("classifier.weight", "head.kernel"), copy("classifier.bias", "head.bias")]
    return out


def to_flaxvision(tensors: dict[str, np.ndarray], config: ViTConfig, *, prefix: str = "vit.") -> dict[str, np.ndarray]:
    """Their tensor dict -> flaxvision flat dict (keys like "blocks.0.attn.qkv.kernel")."""
    names = naming_of(tensors, prefix)
    return import_params(rules(config, prefix=prefix, head="classifier.weight" in tensors, names=names), tensors)


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> ViTForImageClassification state dict."""
    return export(rules(config), params)


# ---- config.json ------------------------------------------------------------------------------------------------


def _config_from_json(cfg: dict[str, Any], what: str) -> dict[str, Any]:
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise FlaxvisionError(
            f"{what}: model_type={model_type!r} is not supported; flaxvision reads transformers ViT weights "
            f"(model_type 'vit'), timm ViTs and big_vision .npz files"
        )
    return encoder_fields(cfg, what, layer_norm_eps=1e-12)


def value(cfg: dict[str, Any], key: str, default: Any, kind: type, what: str) -> Any:
    """config.json's `key` (else `default`), type-checked: an int (not a bool) >= 1, a float (an int is one), or
    a bool; anything else is one FlaxvisionError naming the field."""
    got = cfg.get(key, default)
    if kind is int:
        ok = isinstance(got, int) and not isinstance(got, bool) and got >= 1
    elif kind is float:
        ok = isinstance(got, (int, float)) and not isinstance(got, bool)
    else:
        ok = isinstance(got, kind)
    if not ok:
        expected = "positive integer" if kind is int else kind.__name__
        raise FlaxvisionError(f"{what}: config.json {key}={got!r} is not a {expected}; fix config.json")
    return float(got) if kind is float else got


def encoder_fields(cfg: dict[str, Any], what: str, *, layer_norm_eps: float, act: str = "gelu", mlp_dim: int | None = None) -> dict[str, Any]:
    """ViTConfig fields from the encoder keys every transformers ViT-like config shares (hidden_size,
    num_hidden_layers, ...), with the family's defaults for layer_norm_eps, hidden_act and the MLP size."""
    hidden_act = cfg.get("hidden_act", act)
    if hidden_act not in ACTIVATIONS:
        raise FlaxvisionError(f"{what}: hidden_act={hidden_act!r} is not supported; flaxvision ViTs use {', '.join(ACTIVATIONS)}")
    width = value(cfg, "hidden_size", 768, int, what)
    attention_dropout = "attention_probs_dropout_prob" if "attention_probs_dropout_prob" in cfg else "attention_dropout"
    return dict(
        width=width,
        depth=value(cfg, "num_hidden_layers", 12, int, what),
        num_heads=value(cfg, "num_attention_heads", 12, int, what),
        mlp_dim=mlp_dim if mlp_dim is not None else value(cfg, "intermediate_size", 4 * width, int, what),
        patch_size=square(cfg.get("patch_size", 16), "patch_size", what),
        img_size=square(cfg.get("image_size", 224), "image_size", what),
        in_chans=value(cfg, "num_channels", 3, int, what),
        layer_norm_eps=value(cfg, "layer_norm_eps", layer_norm_eps, float, what),
        qkv_bias=value(cfg, "qkv_bias", True, bool, what),
        act=ACTIVATIONS[hidden_act],
        dropout_rate=value(cfg, "hidden_dropout_prob", 0.0, float, what),
        attention_dropout_rate=value(cfg, attention_dropout, 0.0, float, what),
    )


def config_from_shapes(tensors: dict[str, np.ndarray], prefix: str, names: dict[str, str], what: str, prefix_tokens: int = 1) -> dict[str, Any]:
    """ViTConfig fields from the tensor shapes of a ViT-layout file (ViT, DeiT, DINOv2) without config.json."""

    def get(key: str, ndim: int = 2) -> np.ndarray:
        return require(tensors, key, what, ndim, "; add the config.json that came with the weights")

    kernel = get(f"{prefix}embeddings.patch_embeddings.projection.weight", 4)  # (D, C, p, p)
    width, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    grid = grid_of(get(f"{prefix}embeddings.position_embeddings"), prefix_tokens, what)
    first = prefix + names["layer"].format(0)
    return dict(
        width=width,
        depth=block_count(tensors, prefix + names["layer"].removesuffix("{}.")),
        num_heads=default_num_heads(width),
        mlp_dim=get(f"{first}{names['fc1']}.weight").shape[0],
        patch_size=patch,
        img_size=grid * patch,
        in_chans=in_chans,
        layer_norm_eps=1e-12,
        qkv_bias=f"{first}{names['q']}.bias" in tensors,
    )


def id2label_names(cfg: dict[str, Any] | None) -> tuple[str, ...] | None:
    """id2label in label order, or None when absent or only transformers' placeholders (LABEL_0, ...)."""
    id2label = (cfg or {}).get("id2label") or {}
    try:
        names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except (TypeError, ValueError):
        return None
    return None if not names or all(_DEFAULT_LABEL.fullmatch(n) for n in names) else names


def preprocessing(pre: dict[str, Any] | None, img_size: int, default: Preprocessing | None = None) -> Preprocessing:
    """Preprocessing from preprocessor_config.json (the fields ViTImageProcessor, DeiTImageProcessor,
    BitImageProcessor, CLIPImageProcessor and SiglipImageProcessor share: size as height/width or shortest_edge,
    crop_size, resample, mean, std), or `default` (ViTImageProcessor's defaults) when absent."""
    if pre is None:
        default = default or Preprocessing(img_size=img_size, mean=HALF, std=HALF, crop_pct=1.0, resize_mode="squash", interpolation="bilinear")
        return dataclasses.replace(default, img_size=img_size)
    normalize = pre.get("do_normalize", True)
    mean = tuple(pre.get("image_mean", HALF)) if normalize else (0.0, 0.0, 0.0)
    std = tuple(pre.get("image_std", HALF)) if normalize else (1.0, 1.0, 1.0)
    resample = pre.get("resample", 2)
    interpolation = PIL_FILTERS.get(resample, resample if isinstance(resample, str) else "bilinear")
    size = pre.get("size", {"height": 224, "width": 224})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    crop = pre.get("crop_size") if pre.get("do_center_crop") else None
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if "shortest_edge" in size:
        resize_mode, resized = "shortest", size["shortest_edge"]
    else:
        resize_mode, resized = "squash", size.get("height", img_size)
    crop_pct = min(1.0, crop / resized) if crop and resized else 1.0
    if interpolation not in PIL_FILTERS.values():
        interpolation = "bilinear"
    return Preprocessing(img_size=img_size, mean=mean, std=std, crop_pct=crop_pct, resize_mode=resize_mode, interpolation=interpolation)


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of transformers ViT weights."""
    what = f"transformers weights '{weights.origin}'"
    prefix = "vit." if any(k.startswith("vit.") for k in weights.tensors) else ""
    names = naming_of(weights.tensors, prefix)
    has_head = "classifier.weight" in weights.tensors
    if weights.config is not None:
        fields = _config_from_json(weights.config, what)
        label_names = id2label_names(weights.config)
        id2label = weights.config.get("id2label") or {}
        num_classes = len(id2label) or int(weights.config.get("num_labels", 2))
    else:
        fields = config_from_shapes(weights.tensors, prefix, names, what)
        label_names = None
        num_classes = require(weights.tensors, "classifier.weight", what, 2).shape[0] if has_head else 1
    config = ViTConfig(num_classes=num_classes if has_head else 1, **fields)
    return Parsed(
        format="transformers",
        tensors=weights.tensors,
        config=config,
        rules=rules(config, prefix=prefix, head=has_head, names=names),
        has_head=has_head,
        label_names=label_names if has_head else None,
        preprocessing=preprocessing(weights.preprocessor, config.img_size),
        ignored=tuple(k for k in (prefix + POOLER[0], prefix + POOLER[1]) if k in weights.tensors),
    )


def config_files(config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """config.json and preprocessor_config.json for a ViTForImageClassification with these weights."""
    if not exports(config):
        raise FlaxvisionError(f"transformers' ViTForImageClassification holds a plain ViT, this model has "
                              f"{', '.join(extra_options(config))}; export it with format='timm' or 'flaxvision'")  # fmt: skip
    if prep.crop_pct != 1.0 or prep.resize_mode != "squash":
        logger.warning(
            "ViTImageProcessor resizes straight to %d px; this model's crop_pct=%g / resize_mode=%r are not stored "
            "(format='flaxvision' keeps them)", config.img_size, prep.crop_pct, prep.resize_mode,
        )  # fmt: skip
    labels = label_names or tuple(f"LABEL_{i}" for i in range(config.num_classes))
    model = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": ACTIVATION_NAMES[config.act],
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size,
        "initializer_range": 0.02,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "dtype": "float32",
    }
    pil = {name: code for code, name in PIL_FILTERS.items()}
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": config.img_size, "width": config.img_size},
        "resample": pil[prep.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
    }
    return {"config.json": model, "preprocessor_config.json": processor}


def processor_json(processor_type: str, config: ViTConfig, prep: Preprocessing) -> dict[str, Any]:
    """preprocessor_config.json for `prep` in the fields `preprocessing` reads back: resize (both sides, or the
    shortest edge) to img_size / crop_pct, then a centre crop of img_size."""
    resized = round(config.img_size / prep.crop_pct)
    size = {"shortest_edge": resized} if prep.resize_mode == "shortest" else {"height": resized, "width": resized}
    pil = {name: code for code, name in PIL_FILTERS.items()}
    return {
        "image_processor_type": processor_type,
        "do_resize": True,
        "size": size,
        "resample": pil[prep.interpolation],
        "do_center_crop": prep.crop_pct < 1.0 or prep.resize_mode == "shortest",
        "crop_size": {"height": config.img_size, "width": config.img_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
    }


def labels_json(config: ViTConfig, label_names: tuple[str, ...] | None) -> dict[str, Any]:
    """id2label / label2id for config.json (transformers' LABEL_i placeholders when there are no names)."""
    labels = label_names or tuple(f"LABEL_{i}" for i in range(config.num_classes))
    return {"id2label": {str(i): name for i, name in enumerate(labels)}, "label2id": {name: i for i, name in enumerate(labels)}}


def num_labels(cfg: dict[str, Any]) -> int:
    """The classifier's size config.json declares: its id2label, else num_labels (transformers' default 2)."""
    id2label = cfg.get("id2label") or {}
    return len(id2label) if isinstance(id2label, dict) and id2label else int(cfg.get("num_labels", 2))


def reference_features(module: Any, pixel_values: Any) -> tuple[Any, str]:
    """What flaxvision's `features` equals in a transformers ViT: the final-normed CLS token (ViTModel's tanh
    pooler is not part of flaxvision's ViT)."""
    hidden = getattr(module, "vit", module)(pixel_values=pixel_values).last_hidden_state
    return hidden[:, 0], "last_hidden_state[:, 0] (the CLS token; ViTModel's tanh pooler is not compared)"
