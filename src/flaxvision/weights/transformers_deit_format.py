"""transformers' DeiT weights (model_type 'deit'): config.json + model.safetensors.

transformers' DeiT is a ViT with a distillation token after the CLS token (both have positions: the position
embedding has 2 + patches rows), in three classes, each a flaxvision ViT:
    DeiTForImageClassificationWithTeacher   cls_classifier on the CLS token and distillation_classifier on the
                                            distillation token, logits averaged = flaxvision distilled=True
                                            (head, head_dist)
    DeiTForImageClassification              one classifier on the CLS token; the distillation token is an extra
                                            learned token the head ignores = flaxvision reg_tokens=1 (a register
                                            with a position, no_embed_class=False)
    DeiTModel                               the backbone (its tanh pooler is not loaded: listed as ignored): read
                                            as DeiTForImageClassification's layout, so that the new head is what
                                            transformers fine-tunes (a classifier on the CLS token)
The encoder is transformers' ViT layout (`transformers_format.rules`, under the "deit." prefix), in the weight
files' names or transformers v5's module names. Preprocessing from preprocessor_config.json (DeiTImageProcessor:
resize to 256, centre crop 224, bicubic, ImageNet mean/std), those defaults when absent.
Writing: a distilled ViT -> DeiTForImageClassificationWithTeacher, a ViT with one register token ->
DeiTForImageClassification, each loadable by `getattr(transformers, config["architectures"][0]).from_pretrained`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import flaxvision.weights.transformers_format as vit
from flaxvision.errors import FlaxvisionError
from flaxvision.models.vit import ViTConfig
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from flaxvision.weights.convert import Parsed, Rule, copy, detect_transformers, export, linear
from flaxvision.weights.hub import WeightFiles

FORMAT = "transformers"
FAMILY = "DeiT (model_type 'deit')"
STEM_KERNEL = "patch_embed.kernel"  # the input conv (1-channel models: tiled to RGB on export, gray_stem)
MODEL_TYPES = ("deit",)
DEFAULT_PREPROCESSING = Preprocessing(
    224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=224 / 256, resize_mode="squash", interpolation="bicubic"
)
TEACHER = ("cls_classifier", "distillation_classifier")


def is_layout(keys: Any) -> bool:
    return any(k.endswith("embeddings.distillation_token") for k in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_transformers(weights, MODEL_TYPES, is_layout)


def exports(config: Any) -> bool:
    """A ViT whose only non-plain option is the distillation token (WithTeacher) or one register token."""
    return isinstance(config, ViTConfig) and vit.extra_options(config) in (["distilled=True"], ["reg_tokens=1"])


def refusal(config: Any) -> str | None:
    if isinstance(config, ViTConfig) and vit.family_of(config) == "deit" and not exports(config):
        return (f"transformers' DeiT classes hold a ViT with a distillation token (or one extra token) and a CLS-token head "
                f"only, this model has {', '.join(vit.extra_options(config))}")  # fmt: skip
    return None


def rules(
    config: ViTConfig, *, prefix: str = "deit.", head: bool = True, names: dict[str, str] = vit.FILE_NAMES
) -> list[Rule]:
    """Their tensors <-> flaxvision: the ViT encoder, the distillation token, and the head(s)."""
    out = vit.rules(config, prefix=prefix, head=False, names=names)
    out.append(copy(f"{prefix}embeddings.distillation_token", "dist_token" if config.distilled else "reg_token"))
    if head and config.distilled:
        cls, dist = TEACHER
        out += [linear(f"{cls}.weight", "head.kernel"), copy(f"{cls}.bias", "head.bias"),
                linear(f"{dist}.weight", "head_dist.kernel"), copy(f"{dist}.bias", "head_dist.bias")]  # fmt: skip
    elif head:
        out += [linear("classifier.weight", "head.kernel"), copy("classifier.bias", "head.bias")]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    return export(rules(config), params)


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of transformers DeiT weights."""
    what = f"transformers weights '{weights.origin}'"
    tensors = weights.tensors
    prefix = "deit." if any(k.startswith("deit.") for k in tensors) else ""
    names = vit.naming_of(tensors, prefix)
    teacher, single = f"{TEACHER[0]}.weight" in tensors, "classifier.weight" in tensors
    has_head = teacher or single
    if weights.config is not None:
        fields = vit.encoder_fields(weights.config, what, layer_norm_eps=1e-12)
        num_classes = vit.num_labels(weights.config)
    else:
        fields = vit.config_from_shapes(tensors, prefix, names, what, prefix_tokens=2)
        num_classes = tensors[f"{TEACHER[0]}.weight" if teacher else "classifier.weight"].shape[0] if has_head else 1
    tokens: dict[str, Any] = dict(distilled=True) if teacher else dict(reg_tokens=1)
    config = ViTConfig(num_classes=num_classes if has_head else 1, **fields, **tokens)
    pooler = tuple(k for k in (prefix + vit.POOLER[0], prefix + vit.POOLER[1]) if k in tensors)
    return Parsed(
        format="transformers",
        tensors=tensors,
        config=config,
        rules=rules(config, prefix=prefix, head=has_head, names=names),
        has_head=has_head,
        label_names=vit.id2label_names(weights.config) if has_head else None,
        preprocessing=vit.preprocessing(weights.preprocessor, config.img_size, DEFAULT_PREPROCESSING),
        ignored=pooler,
    )


def reference_features(module: Any, pixel_values: Any) -> tuple[Any, str]:
    """What flaxvision's `features` equals in a transformers DeiT: the final-normed CLS token (and the
    distillation token for WithTeacher); DeiTModel's tanh pooler is not part of flaxvision's ViT."""
    hidden = getattr(module, "deit", module)(pixel_values=pixel_values).last_hidden_state
    if hasattr(module, TEACHER[0]):
        return hidden[:, :2], "last_hidden_state[:, :2] (CLS and distillation tokens)"
    return hidden[:, 0], "last_hidden_state[:, 0] (the CLS token; DeiTModel's tanh pooler is not compared)"


def config_files(
    config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None
) -> dict[str, dict[str, Any]]:
    """config.json and preprocessor_config.json for DeiTForImageClassification(WithTeacher)."""
    if not exports(config):
        raise FlaxvisionError(f"{refusal(config)}; export it with format='timm' or 'flaxvision'")
    model = {
        "architectures": [
            "DeiTForImageClassificationWithTeacher" if config.distilled else "DeiTForImageClassification"
        ],
        "model_type": "deit",
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": vit.ACTIVATION_NAMES[config.act],
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size,
        "initializer_range": 0.02,
        **vit.labels_json(config, label_names),
        "dtype": "float32",
    }
    return {"config.json": model, "preprocessor_config.json": vit.processor_json("DeiTImageProcessor", config, prep)}
