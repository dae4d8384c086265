"""transformers' DINOv2 weights (model_type 'dinov2'): Dinov2Model and Dinov2ForImageClassification.

A pre-LN ViT with layer scale on both residual branches (`layer_scale{1,2}.lambda1` = flaxvision's
`ls{1,2}.gamma`; config.json's layerscale_value is their init value, `init_values`) and LayerNorm eps 1e-6:
    Dinov2Model                    the backbone: flaxvision global_pool="token" (its pooler_output is the final-normed
                                   CLS token), a new head when loaded
    Dinov2ForImageClassification   classifier on concat(CLS, mean of the patch tokens) of the final-normed
                                   tokens = flaxvision global_pool="token_avg"
`embeddings.mask_token` (masked-image pre-training only) is not loaded (listed as ignored). A SwiGLU MLP
(use_swiglu_ffn=True, DINOv2 giant) is refused: flaxvision's ViT has no gated MLP.
Position embeddings at another input size: transformers interpolates at forward time whenever the input differs
from config.image_size (bicubic, antialias=False, in float32); flaxvision resamples once at load, bicubic with
antialiasing as timm does (`weights.posembed`). The two tables differ (tests/test_zoo_transformers.py measures it),
so outputs agree with transformers' at the saved image size only.
Writing: a ViT with layer scale and token_avg pooling -> Dinov2ForImageClassification (mlp_dim a multiple of the
width: transformers' mlp_ratio is an integer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import flaxvision.weights.transformers_format as vit
from flaxvision.errors import FlaxvisionError
from flaxvision.models.vit import ViTConfig
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from flaxvision.weights.convert import Parsed, Rule, conv, copy, detect_transformers, export, fused, linear
from flaxvision.weights.hub import WeightFiles

FORMAT = "transformers"
FAMILY = "DINOv2 (model_type 'dinov2')"
STEM_KERNEL = "patch_embed.kernel"  # the input conv (1-channel models: tiled to RGB on export, gray_stem)
MODEL_TYPES = ("dinov2",)
DEFAULT_PREPROCESSING = Preprocessing(
    224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=224 / 256, resize_mode="shortest", interpolation="bicubic"
)
FILE_NAMES = dict(vit.FILE_NAMES, layer="encoder.layer.{}.", fc1="mlp.fc1", fc2="mlp.fc2")
MODULE_NAMES = dict(vit.MODULE_NAMES, layer="encoder.layer.{}.")
SWIGLU = (".mlp.weights_in.", ".mlp.gate_proj.", ".mlp.w12.")


def is_layout(keys: Any) -> bool:
    return any(k.endswith("layer_scale1.lambda1") for k in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_transformers(weights, MODEL_TYPES, is_layout)


def exports(config: Any) -> bool:
    if not isinstance(config, ViTConfig) or config.init_values is None or config.global_pool != "token_avg":
        return False
    rest = dataclasses.replace(config, init_values=None, global_pool="token")
    return not vit.extra_options(rest) and config.mlp_dim % config.width == 0


def refusal(config: Any) -> str | None:
    if isinstance(config, ViTConfig) and vit.family_of(config) == "dinov2" and not exports(config):
        return ("transformers' Dinov2ForImageClassification holds a ViT with layer scale, a classifier on concat(CLS, mean "
                f"of the patch tokens) and mlp_dim a multiple of the width; this model has {', '.join(vit.extra_options(config))}, "
                f"mlp_dim {config.mlp_dim}")  # fmt: skip
    return None


def rules(
    config: ViTConfig, *, prefix: str = "dinov2.", head: bool = True, names: dict[str, str] = FILE_NAMES
) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a DINOv2."""
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
        out += [copy(f"{src}norm1.weight", f"{dst}norm1.scale"), copy(f"{src}norm1.bias", f"{dst}norm1.bias"),
                fused(tuple(f"{k}.weight" for k in qkv), f"{dst}attn.qkv.kernel", lambda w: w.T, lambda k: k.T, axis=1)]  # fmt: skip
        if config.qkv_bias:
            out.append(fused(tuple(f"{k}.bias" for k in qkv), f"{dst}attn.qkv.bias", lambda b: b, lambda b: b, axis=0))
        out += [
            linear(f"{src}{names['o']}.weight", f"{dst}attn.proj.kernel"),
            copy(f"{src}{names['o']}.bias", f"{dst}attn.proj.bias"),
            copy(f"{src}layer_scale1.lambda1", f"{dst}ls1.gamma"),
            copy(f"{src}norm2.weight", f"{dst}norm2.scale"),
            copy(f"{src}norm2.bias", f"{dst}norm2.bias"),
            linear(f"{src}{names['fc1']}.weight", f"{dst}mlp.fc1.kernel"),
            copy(f"{src}{names['fc1']}.bias", f"{dst}mlp.fc1.bias"),
            linear(f"{src}{names['fc2']}.weight", f"{dst}mlp.fc2.kernel"),
            copy(f"{src}{names['fc2']}.bias", f"{dst}mlp.fc2.bias"),
            copy(f"{src}layer_scale2.lambda1", f"{dst}ls2.gamma"),
        ]
    out += [copy(f"{p}layernorm.weight", "norm.scale"), copy(f"{p}layernorm.bias", "norm.bias")]
    if head:
        out += [linear("classifier.weight", "head.kernel"), copy("classifier.bias", "head.bias")]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    return export(rules(config), params)


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of transformers DINOv2 weights."""
    what = f"transformers weights '{weights.origin}'"
    tensors, cfg = weights.tensors, weights.config
    gated = next((k for k in tensors if any(f in k for f in SWIGLU)), None)
    if (cfg or {}).get("use_swiglu_ffn") or gated:
        raise FlaxvisionError(f"{what}: DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True, the giant model) is not supported: "
                              "flaxvision's ViT has no gated MLP; use a DINOv2 small, base or large checkpoint")  # fmt: skip
    prefix = "dinov2." if any(k.startswith("dinov2.") for k in tensors) else ""
    names = MODULE_NAMES if any(".attention.q_proj." in k for k in tensors) else FILE_NAMES
    has_head = "classifier.weight" in tensors
    if cfg is not None:
        width = vit.value(cfg, "hidden_size", 768, int, what)
        ratio = vit.value(cfg, "mlp_ratio", 4, float, what)
        fields = vit.encoder_fields(cfg, what, layer_norm_eps=1e-6, mlp_dim=int(width * ratio))
        init_values = vit.value(cfg, "layerscale_value", 1.0, float, what)
        fields["drop_path_rate"] = vit.value(cfg, "drop_path_rate", 0.0, float, what)
        num_classes = vit.num_labels(cfg)
    else:
        fields = dict(vit.config_from_shapes(tensors, prefix, names, what), layer_norm_eps=1e-6)
        init_values = 1.0
        num_classes = tensors["classifier.weight"].shape[0] if has_head else 1
    config = ViTConfig(num_classes=num_classes if has_head else 1, init_values=init_values,
                       global_pool="token_avg" if has_head else "token", **fields)  # fmt: skip
    return Parsed(
        format="transformers",
        tensors=tensors,
        config=config,
        rules=rules(config, prefix=prefix, head=has_head, names=names),
        has_head=has_head,
        label_names=vit.id2label_names(cfg) if has_head else None,
        preprocessing=vit.preprocessing(weights.preprocessor, config.img_size, DEFAULT_PREPROCESSING),
        ignored=tuple(k for k in (f"{prefix}embeddings.mask_token",) if k in tensors),
    )


def reference_features(module: Any, pixel_values: Any) -> tuple[Any, str]:
    """What flaxvision's `features` of a DINOv2 backbone (global_pool="token") equals: pooler_output."""
    return getattr(module, "dinov2", module)(
        pixel_values=pixel_values
    ).pooler_output, "pooler_output (the final-normed CLS token)"


def config_files(
    config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None
) -> dict[str, dict[str, Any]]:
    """config.json and preprocessor_config.json for a Dinov2ForImageClassification."""
    if not exports(config):
        raise FlaxvisionError(f"{refusal(config)}; export it with format='timm' or 'flaxvision'")
    model = {
        "architectures": ["Dinov2ForImageClassification"],
        "model_type": "dinov2",
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "mlp_ratio": config.mlp_dim // config.width,
        "hidden_act": vit.ACTIVATION_NAMES[config.act],
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "drop_path_rate": config.drop_path_rate,
        "layer_norm_eps": config.layer_norm_eps,
        "layerscale_value": float(config.init_values or 1.0),
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "use_swiglu_ffn": False,
        "use_mask_token": False,
        "initializer_range": 0.02,
        **vit.labels_json(config, label_names),
        "dtype": "float32",
    }
    return {"config.json": model, "preprocessor_config.json": vit.processor_json("BitImageProcessor", config, prep)}
