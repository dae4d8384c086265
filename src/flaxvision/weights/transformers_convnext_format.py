"""transformers' ConvNeXt weights (ConvNextForImageClassification, ConvNextModel; facebook/convnext-tiny-224).

Layout: convnext.embeddings.patch_embeddings (4x4 conv), convnext.embeddings.layernorm; convnext.encoder.stages.{s}.
downsampling_layer.0 (LayerNorm) / .1 (2x2 conv) for s > 0; ...stages.{s}.layers.{i}.dwconv, layernorm, pwconv1,
pwconv2, layer_scale_parameter; convnext.layernorm (the head's, eps = config.layer_norm_eps, 1e-12 by default);
classifier. ConvNextModel's files have no "convnext." prefix and no classifier. Reading: config.json (depths,
hidden_sizes, layer_norm_eps, layer_scale_init_value, drop_path_rate, num_channels, image_size), else the tensor
shapes; the preprocessing from preprocessor_config.json (a ConvNextImageProcessor), else its defaults.
Writing: the same files, for `ConvNextForImageClassification.from_pretrained(dir)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.models.convnext import ConvNeXtConfig
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.cnn_layouts import layer_norm, processor_config, processor_preprocessing, require, stage_count
from flaxvision.weights.convert import Parsed, Rule, block_count, conv, copy, detect_transformers, export, linear
from flaxvision.weights.hub import WeightFiles
from flaxvision.weights.transformers_format import id2label_names

FORMAT = "transformers"
FAMILY = "ConvNeXt (model_type 'convnext')"
STEM_KERNEL = "stem_conv.kernel"  # the input conv (1-channel models: tiled to RGB on export, gray_stem)
MODEL_TYPES = ("convnext",)
STEM = "embeddings.patch_embeddings.weight"


def is_layout(keys: Any) -> bool:
    return any(k.endswith(STEM) for k in keys) and any(".layers.0.dwconv." in k for k in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_transformers(weights, MODEL_TYPES, is_layout)


def exports(config: Any) -> bool:
    return isinstance(config, ConvNeXtConfig)


def rules(config: ConvNeXtConfig, *, prefix: str = "convnext.", head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping; `prefix` is "convnext." (classifier) or "" (ConvNextModel)."""
    p = prefix
    out = [conv(f"{p}{STEM}", "stem_conv.kernel"), copy(f"{p}embeddings.patch_embeddings.bias", "stem_conv.bias"),
           *layer_norm(f"{p}embeddings.layernorm", "stem_norm")]  # fmt: skip
    for s, depth in enumerate(config.depths):
        src, dst = f"{p}encoder.stages.{s}.", f"stages.{s}."
        if s > 0:
            out += [*layer_norm(f"{src}downsampling_layer.0", f"{dst}downsample_norm"),
                    conv(f"{src}downsampling_layer.1.weight", f"{dst}downsample_conv.kernel"),
                    copy(f"{src}downsampling_layer.1.bias", f"{dst}downsample_conv.bias")]  # fmt: skip
        for i in range(depth):
            b, f = f"{src}layers.{i}.", f"{dst}blocks.{i}."
            out += [conv(f"{b}dwconv.weight", f"{f}conv_dw.kernel"), copy(f"{b}dwconv.bias", f"{f}conv_dw.bias"), *layer_norm(f"{b}layernorm", f"{f}norm"),
                    linear(f"{b}pwconv1.weight", f"{f}fc1.kernel"), copy(f"{b}pwconv1.bias", f"{f}fc1.bias"),
                    linear(f"{b}pwconv2.weight", f"{f}fc2.kernel"), copy(f"{b}pwconv2.bias", f"{f}fc2.bias")]  # fmt: skip
            if config.layer_scale > 0:
                out.append(copy(f"{b}layer_scale_parameter", f"{f}gamma"))
    out += layer_norm(f"{p}layernorm", "norm")
    if head:
        out += [linear("classifier.weight", "head.kernel"), copy("classifier.bias", "head.bias")]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ConvNeXtConfig) -> dict[str, np.ndarray]:
    return export(rules(config), params)


def _fields_from_json(cfg: dict[str, Any], what: str) -> dict[str, Any]:
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise FlaxvisionError(f"{what}: hidden_act={cfg.get('hidden_act')!r} is not supported; flaxvision's ConvNeXt uses gelu")
    if cfg.get("patch_size", 4) != 4:
        raise FlaxvisionError(f"{what}: patch_size={cfg.get('patch_size')!r} is not supported; flaxvision's ConvNeXt has a 4x4 stem")
    depths, sizes = cfg.get("depths", [3, 3, 9, 3]), cfg.get("hidden_sizes", [96, 192, 384, 768])
    stages = cfg.get("num_stages", len(depths) if isinstance(depths, list) else 4)
    if not isinstance(depths, list) or not isinstance(sizes, list) or not len(depths) == len(sizes) == stages:
        raise FlaxvisionError(f"{what}: depths {depths!r}, hidden_sizes {sizes!r} and num_stages {stages!r} must agree")
    scale = cfg.get("layer_scale_init_value", 1e-6)
    image_size = cfg.get("image_size", 224)
    return dict(depths=tuple(depths), dims=tuple(sizes), in_chans=cfg.get("num_channels", 3), img_size=image_size,
                layer_scale=float(scale) if isinstance(scale, (int, float)) and scale > 0 else 0.0,
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), drop_path_rate=float(cfg.get("drop_path_rate", 0.0)))  # fmt: skip


def _fields_from_shapes(tensors: dict[str, np.ndarray], prefix: str, what: str) -> dict[str, Any]:
    stem = require(tensors, f"{prefix}{STEM}", what)
    depths, dims = [], []
    for s in range(stage_count(tensors, f"{prefix}encoder.stages.{{}}.")):
        depths.append(block_count(tensors, f"{prefix}encoder.stages.{s}.layers."))
        dims.append(int(require(tensors, f"{prefix}encoder.stages.{s}.layers.0.dwconv.weight", what).shape[0]))
    scaled = f"{prefix}encoder.stages.0.layers.0.layer_scale_parameter" in tensors
    return dict(depths=tuple(depths), dims=tuple(dims), in_chans=int(stem.shape[1]), layer_scale=1e-6 if scaled else 0.0,
                layer_norm_eps=1e-12)  # fmt: skip


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of transformers ConvNeXt weights."""
    what = f"transformers weights '{weights.origin}'"
    tensors = weights.tensors
    prefix = "convnext." if any(k.startswith("convnext.") for k in tensors) else ""
    has_head = "classifier.weight" in tensors
    if weights.config is not None:
        fields = _fields_from_json(weights.config, what)
        num_classes = len(weights.config.get("id2label") or {}) or int(weights.config.get("num_labels", 2))
        label_names = id2label_names(weights.config)
    else:
        fields = _fields_from_shapes(tensors, prefix, what)
        num_classes, label_names = (int(tensors["classifier.weight"].shape[0]) if has_head else 1), None
    config = ConvNeXtConfig(num_classes=num_classes if has_head else 1, **fields)
    return Parsed(
        format="transformers",
        tensors=tensors,
        config=config,
        rules=rules(config, prefix=prefix, head=has_head),
        has_head=has_head,
        label_names=label_names if has_head else None,
        preprocessing=processor_preprocessing(weights.preprocessor, config.img_size),
    )


def config_files(config: ConvNeXtConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """config.json and preprocessor_config.json for a ConvNextForImageClassification with these weights."""
    labels = label_names or tuple(f"LABEL_{i}" for i in range(config.num_classes))
    model = {
        "architectures": ["ConvNextForImageClassification"],
        "model_type": "convnext",
        "num_channels": config.in_chans,
        "patch_size": 4,
        "num_stages": len(config.depths),
        "hidden_sizes": list(config.dims),
        "depths": list(config.depths),
        "hidden_act": "gelu",
        "layer_norm_eps": config.layer_norm_eps,
        "layer_scale_init_value": config.layer_scale,
        "drop_path_rate": config.drop_path_rate,
        "image_size": config.img_size,
        "initializer_range": 0.02,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "dtype": "float32",
    }
    return {"config.json": model, "preprocessor_config.json": processor_config(prep, config.img_size)}
