"""transformers' CLIP and SigLIP image towers (model_type 'clip_vision_model', 'clip', 'siglip_vision_model',
'siglip'): one encoder layout, `[vision_model.]encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj,
layer_norm2, mlp.fc1, mlp.fc2}` (the same in weight files and v5's module names), and two embeddings/heads:

CLIP (Radford et al. 2021): `embeddings.class_embedding` (D,) = cls_token, `embeddings.patch_embedding` without
bias (patch_bias=False), `embeddings.position_embedding.weight` (T, D), an nn.Embedding table = pos_embed,
`pre_layrnorm` (sic) = norm_pre (pre_norm=True), `post_layernorm` = norm; hidden_act quick_gelu, eps 1e-5.
    CLIPVisionModel(WithProjection), CLIPModel   the backbone: pooler_output = post_layernorm(CLS) = flaxvision's
                                                 features with global_pool="token"; a new head when loaded. The
                                                 text tower, the projections and logit_scale are not loaded (ignored).
    CLIPForImageClassification                   refused: it classifies the mean of the patch tokens *without* a
                                                 final norm (post_layernorm is unused), which flaxvision's ViT,
                                                 whose final norm always applies, cannot express.
SigLIP (Zhai et al. 2023): no CLS token (class_token=False), a patch bias, `post_layernorm` = norm; hidden_act
gelu_pytorch_tanh, eps 1e-6.
    SiglipVisionModel, SiglipModel   with the attention-pool head (vision_use_head, the default): global_pool="map",
                                     `head.probe` = attn_pool.latent, `head.attention` (an nn.MultiheadAttention:
                                     in_proj_weight [q; k; v], out_proj) = attn_pool.q / kv / proj, `head.layernorm`
                                     = attn_pool.norm, `head.mlp` = attn_pool.mlp; pooler_output = features.
                                     Without the head: global_pool="avg" over every token, fc_norm=False.
    SiglipForImageClassification     classifier on the mean of the post_layernorm'd tokens = global_pool="avg",
                                     class_token=False, fc_norm=False; its attention-pool head is computed but
                                     unused, so it is not loaded (ignored).
Writing: a SigLIP-style ViT with avg pooling -> SiglipForImageClassification (vision_use_head=False). A "map"
(attention-pool) model has no transformers class with a classifier (SiglipForImageClassification ignores the
head's output, SiglipVisionModel has no classifier), nor has a CLIP-style ViT with its CLS-token classifier:
both are refused with the reason (timm's and flaxvision's formats hold them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import flaxvision.weights.transformers_format as vit
from flaxvision.errors import FlaxvisionError
from flaxvision.models.vit import ViTConfig
from flaxvision.preprocessing import HALF, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocessing
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
    linear,
)
from flaxvision.weights.hub import WeightFiles

FORMAT = "transformers"
FAMILY = "CLIP / SigLIP image towers (model_type 'clip', 'siglip' and their *_vision_model)"
STEM_KERNEL = "patch_embed.kernel"  # the input conv (1-channel models: tiled to RGB on export, gray_stem)
MODEL_TYPES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")
PREPROCESSING = {
    "clip": Preprocessing(
        224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_pct=1.0, resize_mode="shortest", interpolation="bicubic"
    ),
    "siglip": Preprocessing(224, HALF, HALF, crop_pct=1.0, resize_mode="squash", interpolation="bicubic"),
}
# transformers' CLIPVisionConfig / SiglipVisionConfig defaults for what config.json leaves out.
DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(patch_size=32, layer_norm_eps=1e-5, act="quick_gelu"),
    "siglip": dict(patch_size=16, layer_norm_eps=1e-6, act="gelu_pytorch_tanh"),
}
IN_PROJ = ("head.attention.in_proj_weight", "head.attention.in_proj_bias")  # split into [q] and [kv] parts when read


def is_layout(keys: Any) -> bool:
    return any(k.endswith("embeddings.patch_embedding.weight") for k in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_transformers(weights, MODEL_TYPES, is_layout)


def exports(config: Any) -> bool:
    """SiglipForImageClassification: no CLS token, the mean of every final-normed token, qkv biases."""
    if not isinstance(config, ViTConfig) or config.class_token or config.global_pool != "avg" or config.use_fc_norm:
        return False
    rest = dataclasses.replace(config, class_token=True, global_pool="token", fc_norm=None)
    return not vit.extra_options(rest) and config.qkv_bias


def refusal(config: Any) -> str | None:
    if not isinstance(config, ViTConfig) or exports(config) or vit.family_of(config) not in ("clip", "siglip"):
        return None
    if vit.family_of(config) == "clip":
        return ("transformers has no class for a CLIP image tower with a CLS-token classifier (CLIPForImageClassification "
                "averages the patch tokens without the final norm, CLIPVisionModel has no classifier)")  # fmt: skip
    return ("transformers' SigLIP classes hold a classifier on the mean of the tokens only (SiglipForImageClassification; "
            f"SiglipVisionModel has no classifier), this model has {', '.join(vit.extra_options(config))}")  # fmt: skip


def rules(config: ViTConfig, *, prefix: str = "vision_model.", head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision for a CLIP (class_token) or SigLIP (no class token) image tower."""
    p = f"{prefix}embeddings."
    out = [conv(f"{p}patch_embedding.weight", "patch_embed.kernel"),
           Rule((f"{p}position_embedding.weight",), "pos_embed", lambda w: w[None], lambda k: (k[0],))]  # fmt: skip
    if config.patch_bias:
        out.append(copy(f"{p}patch_embedding.bias", "patch_embed.bias"))
    if config.class_token:
        out.append(
            Rule((f"{p}class_embedding",), "cls_token", lambda w: w.reshape(1, 1, -1), lambda k: (k.reshape(-1),))
        )
    if config.pre_norm:
        out += _norm(f"{prefix}pre_layrnorm", "norm_pre")
    for i in range(config.depth):
        src, dst = f"{prefix}encoder.layers.{i}.", f"blocks.{i}."
        qkv = [f"{src}self_attn.{n}_proj" for n in "qkv"]
        out += _norm(f"{src}layer_norm1", f"{dst}norm1") + [
            fused(tuple(f"{k}.weight" for k in qkv), f"{dst}attn.qkv.kernel", lambda w: w.T, lambda k: k.T, axis=1),
            fused(tuple(f"{k}.bias" for k in qkv), f"{dst}attn.qkv.bias", lambda b: b, lambda b: b, axis=0),
            *_linear(f"{src}self_attn.out_proj", f"{dst}attn.proj"),
            *_norm(f"{src}layer_norm2", f"{dst}norm2"),
            *_linear(f"{src}mlp.fc1", f"{dst}mlp.fc1"),
            *_linear(f"{src}mlp.fc2", f"{dst}mlp.fc2"),
        ]
    out += _norm(f"{prefix}post_layernorm", "norm")
    if config.global_pool == "map":
        h = f"{prefix}head."
        out += [copy(f"{h}probe", "attn_pool.latent"),
                linear(f"{prefix}{IN_PROJ[0]}[q]", "attn_pool.q.kernel"), copy(f"{prefix}{IN_PROJ[1]}[q]", "attn_pool.q.bias"),
                linear(f"{prefix}{IN_PROJ[0]}[kv]", "attn_pool.kv.kernel"), copy(f"{prefix}{IN_PROJ[1]}[kv]", "attn_pool.kv.bias"),
                *_linear(f"{h}attention.out_proj", "attn_pool.proj"), *_norm(f"{h}layernorm", "attn_pool.norm"),
                *_linear(f"{h}mlp.fc1", "attn_pool.mlp.fc1"), *_linear(f"{h}mlp.fc2", "attn_pool.mlp.fc2")]  # fmt: skip
    if head:
        out += _linear("classifier", "head")
    return out


def _norm(src: str, dst: str) -> list[Rule]:
    return [copy(f"{src}.weight", f"{dst}.scale"), copy(f"{src}.bias", f"{dst}.bias")]


def _linear(src: str, dst: str) -> list[Rule]:
    return [linear(f"{src}.weight", f"{dst}.kernel"), copy(f"{src}.bias", f"{dst}.bias")]


def _split_in_proj(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """nn.MultiheadAttention's fused [q; k; v] input projection as the [q] and [kv] parts flaxvision's attention
    pool keeps (a wrongly shaped tensor still splits, and the layout check then names it)."""
    weight_key, bias_key = (prefix + k for k in IN_PROJ)
    if weight_key not in tensors or tensors[weight_key].ndim != 2:
        return tensors
    out = dict(tensors)
    width = out[weight_key].shape[1]
    for key in (weight_key, bias_key):
        if key in out:
            value = out.pop(key)
            out[f"{key}[q]"], out[f"{key}[kv]"] = value[:width], value[width:]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    tensors = export(rules(config), params)
    for key in (
        f"vision_model.{k}" for k in IN_PROJ
    ):  # a "map" model (never written by save_pretrained) joins q and kv
        if f"{key}[q]" in tensors:
            tensors[key] = np.concatenate([tensors.pop(f"{key}[q]"), tensors.pop(f"{key}[kv]")], axis=0)
    return tensors


def _shape_fields(tensors: dict[str, np.ndarray], prefix: str, family: str, what: str) -> dict[str, Any]:
    """ViTConfig fields from the tensor shapes of a file without config.json (transformers' defaults for the rest)."""

    def get(key: str) -> np.ndarray:
        if prefix + key not in tensors:
            raise FlaxvisionError(
                f"{what}: cannot infer the architecture without '{prefix + key}'; add the config.json that came with the weights"
            )
        return tensors[prefix + key]

    kernel = get("embeddings.patch_embedding.weight")  # (D, C, p, p)
    width, patch = kernel.shape[0], kernel.shape[2]
    grid = round((get("embeddings.position_embedding.weight").shape[0] - (family == "clip")) ** 0.5)
    return dict(
        width=width, depth=block_count(tensors, f"{prefix}encoder.layers."), num_heads=default_num_heads(width),
        mlp_dim=get("encoder.layers.0.mlp.fc1.weight").shape[0], patch_size=patch, img_size=grid * patch,
        in_chans=kernel.shape[1], layer_norm_eps=DEFAULTS[family]["layer_norm_eps"], act=vit.ACTIVATIONS[DEFAULTS[family]["act"]],
    )  # fmt: skip


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of a transformers CLIP or SigLIP image tower."""
    what = f"transformers weights '{weights.origin}'"
    cfg = weights.config
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in weights.tensors) else ""
    if cfg is not None:
        family = "clip" if str(cfg.get("model_type")).startswith("clip") else "siglip"
    else:
        family = "clip" if any(k.endswith("embeddings.class_embedding") for k in weights.tensors) else "siglip"
    has_head = "classifier.weight" in weights.tensors
    if family == "clip" and has_head:
        raise FlaxvisionError(f"{what}: CLIPForImageClassification classifies the mean of the patch tokens without a final "
                              "norm (its post_layernorm is unused), which flaxvision's ViT cannot express; load the "
                              "CLIPVisionModel / CLIPModel weights with num_classes= for a new head")  # fmt: skip
    tensors = _split_in_proj(weights.tensors, prefix)
    attention_pool = not has_head and f"{prefix}head.probe" in tensors
    if cfg is not None:
        vision = cfg.get("vision_config", {}) if cfg.get("model_type") in ("clip", "siglip") else cfg
        if not isinstance(vision, dict):
            raise FlaxvisionError(f"{what}: config.json vision_config={vision!r} is not an object; fix config.json")
        defaults = DEFAULTS[family]
        fields = vit.encoder_fields(
            dict(vision, qkv_bias=True), what, layer_norm_eps=defaults["layer_norm_eps"], act=defaults["act"]
        )
        fields["patch_size"] = vit.square(vision.get("patch_size", defaults["patch_size"]), "patch_size", what)
        num_classes = vit.num_labels(cfg)
    else:
        fields = _shape_fields(tensors, prefix, family, what)
        num_classes = tensors["classifier.weight"].shape[0] if has_head else 1
    tokens: dict[str, Any]
    if family == "clip":
        tokens = dict(pre_norm=True, patch_bias=False)
    else:
        tokens = dict(class_token=False, global_pool="map" if attention_pool else "avg", fc_norm=False)
    config = ViTConfig(num_classes=num_classes if has_head else 1, **fields, **tokens)
    return Parsed(
        format="transformers",
        tensors=tensors,
        config=config,
        rules=rules(config, prefix=prefix, head=has_head),
        has_head=has_head,
        label_names=vit.id2label_names(cfg) if has_head else None,
        preprocessing=vit.preprocessing(weights.preprocessor, config.img_size, PREPROCESSING[family]),
        ignored=_ignored(tensors, prefix, has_head),
    )


def _ignored(tensors: dict[str, np.ndarray], prefix: str, has_head: bool) -> tuple[str, ...]:
    """What an image classifier does not use: everything outside the image tower (CLIPModel's / SiglipModel's text
    tower, projections, logit scale and bias), position_ids buffers (older files), and the attention-pool head
    that SiglipForImageClassification computes but does not classify with."""

    def unused(key: str) -> bool:
        if key.startswith("classifier."):
            return False
        outside = bool(prefix) and not key.startswith(prefix)
        return outside or key.endswith("embeddings.position_ids") or (has_head and key.startswith(f"{prefix}head."))

    return tuple(sorted(k for k in tensors if unused(k)))


def reference_features(module: Any, pixel_values: Any) -> tuple[Any, str]:
    """What flaxvision's `features` of a CLIP / SigLIP backbone equals: pooler_output (post_layernorm(CLS) for
    CLIP, the attention-pool head for SigLIP), or the mean of last_hidden_state for a SigLIP without the head."""
    out = getattr(module, "vision_model", module)(pixel_values=pixel_values)
    if out.pooler_output is None:
        return out.last_hidden_state.mean(
            dim=1
        ), "last_hidden_state.mean(1) (post_layernorm'd tokens; no attention-pool head)"
    return out.pooler_output, "pooler_output"


def config_files(
    config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None
) -> dict[str, dict[str, Any]]:
    """config.json and preprocessor_config.json for a SiglipForImageClassification (without the unused head)."""
    if not exports(config):
        raise FlaxvisionError(f"{refusal(config)}; export it with format='timm' or 'flaxvision'")
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": config.width,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "num_channels": config.in_chans,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "hidden_act": vit.ACTIVATION_NAMES[config.act],
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": config.attention_dropout_rate,
        "vision_use_head": False,
    }
    model = {"architectures": ["SiglipForImageClassification"], "model_type": "siglip", "vision_config": vision, "text_config": {},
             **vit.labels_json(config, label_names), "dtype": "float32"}  # fmt: skip
    return {"config.json": model, "preprocessor_config.json": vit.processor_json("SiglipImageProcessor", config, prep)}
