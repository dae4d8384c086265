"""The model zoo: timm's names mapped to flaxvision configs.

    >>> model = flaxvision.create_model("vit_base_patch16_224", num_classes=20)
    >>> flaxvision.list_models("vit_*")
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError, FlaxvisionError, did_you_mean
from flaxvision.models.base import Classifier
from flaxvision.models.cnn import CNN, CNNConfig
from flaxvision.models.resnet import ResNet, ResNetConfig
from flaxvision.models.vit import ViT, ViTConfig
from flaxvision.preprocessing import HALF, IMAGENET_MEAN, IMAGENET_STD, Preprocessing

MODEL_CLASSES: dict[type, type[Classifier]] = {ViTConfig: ViT, ResNetConfig: ResNet, CNNConfig: CNN}
_DEFAULT_NORMALISATION = {
    ViTConfig: (HALF, HALF),  # google/vit-* and the ViT tutorial
    ResNetConfig: (IMAGENET_MEAN, IMAGENET_STD),  # torchvision, and the CIFAR-10 ResNet-18 tutorial
    CNNConfig: ((0.0,), (1.0,)),  # the MNIST tutorial: pixels / 255
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config: Any  # the default config (a frozen dataclass)
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, config: Any, description: str) -> None:
    """Add a named default config to the zoo (e.g. from a plug-in); the name must be new."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if type(config) not in MODEL_CLASSES:
        raise TypeError(f"no model class for config type {type(config).__name__}")
    _REGISTRY[name] = ModelSpec(name, config, description)


_VIT_SIZES = {
    "tiny": (ViTConfig.tiny, "ViT-Ti (DeiT-Tiny)"),
    "small": (ViTConfig.small, "ViT-S"),
    "base": (ViTConfig.base, "ViT-B"),
    "large": (ViTConfig.large, "ViT-L"),
}
for _size, (_make, _label) in _VIT_SIZES.items():
    for _patch in (16, 32):
        register_model(f"vit_{_size}_patch{_patch}_224", _make(patch=_patch), f"{_label}/{_patch}, 224 px, CLS-token head")
register_model("resnet18", ResNetConfig.resnet18(), "ResNet-18, 7x7 stem (ImageNet), 224 px")
register_model("resnet18_cifar", ResNetConfig.resnet18_cifar(), "ResNet-18, 3x3 stem (CIFAR), 32 px")
register_model("cnn", CNNConfig(), "The MNIST tutorial CNN: conv32-pool-conv64-pool-dense256, 28 px grayscale")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` is a shell-style wildcard such as "vit_*_patch16_*"."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FlaxvisionError(
            f"unknown model {name!r}{did_you_mean(name, _REGISTRY)}; `flaxvision models` lists them all"
        ) from None


def _dtype_name(dtype: Any) -> str:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ConfigError(f"dtype {dtype!r} is not a dtype; use float32 or bfloat16") from None


def model_config(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    dtype: Any = None,
    **overrides: Any,
) -> Any:
    """The config `create_model` would build: the registered default with the given fields replaced."""
    config = get_model_spec(name).config
    changes = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans).items() if v is not None}
    if dtype is not None:
        changes["dtype"] = _dtype_name(dtype)
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"{name} has no option {', '.join(map(repr, unknown))}{did_you_mean(unknown[0], fields)}; "
            f"options: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **changes, **overrides)


def default_preprocessing(config: Any) -> Preprocessing:
    """Normalisation a model trained from scratch uses: the tutorials' choices for each family."""
    mean, std = _DEFAULT_NORMALISATION[type(config)]
    return Preprocessing(img_size=config.img_size, mean=mean, std=std).for_channels(config.in_chans)


def build_model(
    config: Any,
    *,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
    label_names: Sequence[str] | None = None,
) -> Classifier:
    """Instantiate the model for a config with fresh weights drawn from `seed`."""
    try:
        cls = MODEL_CLASSES[type(config)]
    except KeyError:
        raise ConfigError(f"no flaxvision model takes a {type(config).__name__}") from None
    if label_names is not None and len(label_names) != config.num_classes:
        raise ConfigError(f"{len(label_names)} label names for a model with num_classes={config.num_classes}")
    model = cls(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    model.preprocessing = preprocessing or default_preprocessing(config)
    model.label_names = tuple(label_names) if label_names is not None else None
    return model


def create_model(
    name: str | None,
    *,
    pretrained: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    dtype: Any = None,
    seed: int = 0,
    **overrides: Any,
) -> Classifier:
    """Build a registered model with fresh weights, or from pretrained weights.

    Args:
      name: a name from `list_models()`, e.g. "vit_base_patch16_224"; with `pretrained`, the checkpoint must
        have this architecture, and None accepts whatever it holds.
      pretrained: a checkpoint (Hub repo id, directory, .safetensors or .npz file) loaded by
        `flaxvision.load_pretrained`, which also takes the Hub/pickle options as **overrides.
      num_classes, img_size, in_chans: replace the registered defaults (None keeps them, or the checkpoint's).
      dtype: compute dtype ("float32", "bfloat16", or a jnp dtype); parameters stay float32.
      seed: seeds parameter initialisation (and dropout's stream seed + 1).
      **overrides: any other config field, e.g. drop_path_rate=0.1, depth=6.

    Example: `create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)`,
    `create_model("vit_base_patch16_224", pretrained="google/vit-base-patch16-224", num_classes=20)`.
    """
    if pretrained is not None:
        from flaxvision.weights.loader import load_pretrained

        if in_chans is not None:
            overrides["in_chans"] = in_chans
        return load_pretrained(
            pretrained, name=name, num_classes=num_classes, img_size=img_size, dtype=dtype, seed=seed, **overrides
        )
    if name is None:
        raise FlaxvisionError("create_model needs a model name, or pretrained= to build what a checkpoint holds")
    config = model_config(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, dtype=dtype, **overrides)
    return build_model(config, seed=seed)


def abstract_model(config: Any) -> Classifier:
    """The model with shape-only parameters (no memory, no compute): for counting and for weight import."""
    return nnx.eval_shape(lambda: build_model(config))


def model_info(name: str, **kwargs: Any) -> dict[str, Any]:
    """name, params, gflops, img_size (and description) of a registered model, without allocating weights."""
    config = model_config(name, **kwargs)
    return {
        "name": name,
        "params": config.param_count(),
        "gflops": round(config.forward_flops() / 1e9, 3),
        "img_size": config.img_size,
        "description": get_model_spec(name).description,
    }
