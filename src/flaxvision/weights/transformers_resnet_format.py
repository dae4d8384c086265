"""transformers' ResNet weights (ResNetForImageClassification, ResNetModel; microsoft/resnet-50): config.json + model.safetensors.

Layout: resnet.embedder.embedder.convolution / .normalization (7x7 stem); resnet.encoder.stages.{s}.layers.{i}.
shortcut.convolution / .normalization and layer.{k}.convolution / .normalization (k = 0, 1 basic; 0, 1, 2
bottleneck); classifier.1 (after a Flatten). ResNetModel's files have no "resnet." prefix and no classifier.
transformers' hidden_sizes are the stages' output widths (4x flaxvision's bottleneck widths); its stride is on
the 3x3 (downsample_in_bottleneck=False) and the first stage keeps the resolution (downsample_in_first_stage=False),
as timm's and torchvision's: the other settings are refused. The preprocessing comes from preprocessor_config.json
(a ConvNextImageProcessor), else its defaults. Writing: the same files, for
`ResNetForImageClassification.from_pretrained(dir)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.models.resnet import ResNetConfig
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.cnn_layouts import (
    batchnorm,
    counters,
    processor_config,
    processor_preprocessing,
    require,
    stage_count,
)
from flaxvision.weights.convert import Parsed, Rule, block_count, conv, copy, detect_transformers, export, linear
from flaxvision.weights.hub import WeightFiles
from flaxvision.weights.transformers_format import id2label_names

FORMAT = "transformers"
FAMILY = "ResNet (model_type 'resnet')"
STEM_KERNEL = "conv1.kernel"  # the input conv (1-channel models: tiled to RGB on export, gray_stem)
MODEL_TYPES = ("resnet",)
STEM = "embedder.embedder."
LAYER_TYPES = {"basic": "basic", "bottleneck": "bottleneck"}


def is_layout(keys: Any) -> bool:
    return any(k.endswith(STEM + "convolution.weight") for k in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_transformers(weights, MODEL_TYPES, is_layout)


def exports(config: Any) -> bool:
    return isinstance(config, ResNetConfig) and config.stem == "imagenet"


def rules(config: ResNetConfig, *, prefix: str = "resnet.", head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping; `prefix` is "resnet." (classifier) or "" (ResNetModel)."""
    out = [conv(f"{prefix}{STEM}convolution.weight", "conv1.kernel"), *batchnorm(f"{prefix}{STEM}normalization", "bn1")]
    cin = config.stem_channels
    for s, (depth, width) in enumerate(zip(config.stage_depths, config.stage_widths, strict=True)):
        cout = width * config.expansion
        for i in range(depth):
            src, dst = f"{prefix}encoder.stages.{s}.layers.{i}.", f"stages.{s}.{i}."
            if (s > 0 and i == 0) or cin != cout:
                out += [conv(f"{src}shortcut.convolution.weight", f"{dst}downsample_conv.kernel"),
                        *batchnorm(f"{src}shortcut.normalization", f"{dst}downsample_bn")]  # fmt: skip
            for k in range(3 if config.block == "bottleneck" else 2):
                out += [conv(f"{src}layer.{k}.convolution.weight", f"{dst}conv{k + 1}.kernel"),
                        *batchnorm(f"{src}layer.{k}.normalization", f"{dst}bn{k + 1}")]  # fmt: skip
            cin = cout
    if head:
        out += [linear("classifier.1.weight", "head.kernel"), copy("classifier.1.bias", "head.bias")]
    return out


def from_flaxvision(params: dict[str, np.ndarray], config: ResNetConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> ResNetForImageClassification state dict (from_pretrained recreates the step counters)."""
    return export(rules(config), params)


def _fields_from_json(cfg: dict[str, Any], what: str) -> dict[str, Any]:
    for name in ("downsample_in_first_stage", "downsample_in_bottleneck"):
        if cfg.get(name, False):
            raise FlaxvisionError(f"{what}: {name}=True is not supported; flaxvision's ResNet strides the 3x3 of each later stage's first block")
    if cfg.get("hidden_act", "relu") != "relu":
        raise FlaxvisionError(f"{what}: hidden_act={cfg.get('hidden_act')!r} is not supported; flaxvision's ResNet uses relu")
    layer_type = cfg.get("layer_type", "bottleneck")
    if layer_type not in LAYER_TYPES:
        raise FlaxvisionError(f"{what}: layer_type={layer_type!r} is not supported; use basic or bottleneck")
    sizes, depths = cfg.get("hidden_sizes", [256, 512, 1024, 2048]), cfg.get("depths", [3, 4, 6, 3])
    if not isinstance(sizes, list) or not isinstance(depths, list) or len(sizes) != len(depths) or not sizes:
        raise FlaxvisionError(f"{what}: hidden_sizes {sizes!r} and depths {depths!r} must be lists of equal length")
    expansion = 4 if layer_type == "bottleneck" else 1
    if any(not isinstance(h, int) or h % expansion for h in sizes):
        raise FlaxvisionError(f"{what}: hidden_sizes {sizes} must be integers divisible by 4 (the bottleneck reduction)")
    return dict(stage_depths=tuple(depths), stage_widths=tuple(h // expansion for h in sizes), block=LAYER_TYPES[layer_type],
                stem_width=cfg.get("embedding_size", 64), in_chans=cfg.get("num_channels", 3))  # fmt: skip


def _fields_from_shapes(tensors: dict[str, np.ndarray], prefix: str, what: str) -> dict[str, Any]:
    stem = require(tensors, f"{prefix}{STEM}convolution.weight", what)
    bottleneck = f"{prefix}encoder.stages.0.layers.0.layer.2.convolution.weight" in tensors
    depths, widths = [], []
    for s in range(stage_count(tensors, f"{prefix}encoder.stages.{{}}.")):
        depths.append(block_count(tensors, f"{prefix}encoder.stages.{s}.layers."))
        widths.append(int(require(tensors, f"{prefix}encoder.stages.{s}.layers.0.layer.0.convolution.weight", what).shape[0]))
    return dict(stage_depths=tuple(depths), stage_widths=tuple(widths), block="bottleneck" if bottleneck else "basic",
                stem_width=int(stem.shape[0]), in_chans=int(stem.shape[1]))  # fmt: skip


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of transformers ResNet weights."""
    what = f"transformers weights '{weights.origin}'"
    tensors = weights.tensors
    prefix = "resnet." if any(k.startswith("resnet.") for k in tensors) else ""
    has_head = "classifier.1.weight" in tensors
    if weights.config is not None:
        fields = _fields_from_json(weights.config, what)
        num_classes = len(weights.config.get("id2label") or {}) or int(weights.config.get("num_labels", 2))
        label_names = id2label_names(weights.config)
    else:
        fields = _fields_from_shapes(tensors, prefix, what)
        num_classes, label_names = (int(tensors["classifier.1.weight"].shape[0]) if has_head else 1), None
    if fields["stem_width"] == fields["stage_widths"][0]:
        fields["stem_width"] = None
    size = (weights.preprocessor or {}).get("size", {})
    img_size = size.get("shortest_edge", 224) if isinstance(size, dict) else 224
    config = ResNetConfig(num_classes=num_classes if has_head else 1, img_size=img_size, **fields)
    return Parsed(
        format="transformers",
        tensors=tensors,
        config=config,
        rules=rules(config, prefix=prefix, head=has_head),
        has_head=has_head,
        label_names=label_names if has_head else None,
        preprocessing=processor_preprocessing(weights.preprocessor, config.img_size),
        ignored=counters(tensors),
    )


def config_files(config: ResNetConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """config.json and preprocessor_config.json for a ResNetForImageClassification with these weights."""
    labels = label_names or tuple(f"LABEL_{i}" for i in range(config.num_classes))
    model = {
        "architectures": ["ResNetForImageClassification"],
        "model_type": "resnet",
        "num_channels": config.in_chans,
        "embedding_size": config.stem_channels,
        "hidden_sizes": [w * config.expansion for w in config.stage_widths],
        "depths": list(config.stage_depths),
        "layer_type": config.block,
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "dtype": "float32",
    }
    return {"config.json": model, "preprocessor_config.json": processor_config(prep, config.img_size)}
