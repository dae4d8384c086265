"""The model zoo: names -> default configs, and config type -> model class. A leaf: it imports no model family.

Each family registers itself when imported (`flaxvision.models` imports them all, so the zoo is always full):

    register_family(ViTConfig, ViT, mean=HALF, std=HALF)
    register_model("vit_base_patch16_224", ViTConfig.base(patch=16), "ViT-B/16, 224 px, CLS-token head")

`build_model` / `abstract_model` instantiate a config; `flaxvision.models.factory.create_model` (which may load
pretrained weights) sits above this module and the weight loaders.

    >>> flaxvision.list_models("vit_*")
    >>> flaxvision.model_config("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError, FlaxvisionError, did_you_mean
from flaxvision.preprocessing import Preprocessing

# Config fields that size or train a model without changing which layers it has (ignored by `name_of`).
RUN_FIELDS = frozenset({"num_classes", "img_size", "in_chans", "dtype", "dropout_rate", "attention_dropout_rate",
                        "drop_path_rate", "bn_momentum", "scan_blocks", "remat"})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its module class and the normalisation a model trained from scratch uses."""

    model_class: type
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered name: its default config, and the preprocessing of its published weights (timm's
    pretrained_cfg: mean, std, crop, interpolation), when they have one."""

    name: str
    config: Any  # the default config (a frozen dataclass)
    description: str
    preprocessing: Preprocessing | None = None


_FAMILIES: dict[type, Family] = {}
_REGISTRY: dict[str, ModelSpec] = {}


def register_family(config_class: type, model_class: type, *, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make `model_class` the model built for `config_class`, with this default normalisation (3-channel)."""
    known = _FAMILIES.get(config_class)
    if known is not None and known.model_class is not model_class:
        raise ValueError(f"{config_class.__name__} is already built by {known.model_class.__name__}")
    _FAMILIES[config_class] = Family(model_class, tuple(mean), tuple(std))


def register_model(name: str, config: Any, description: str, *, preprocessing: Preprocessing | None = None) -> None:
    """Add a named default config to the zoo (e.g. from a plug-in); the name must be new. `preprocessing`: that of
    the name's published weights (a model built from the name uses it; one trained from scratch the family's)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if type(config) not in _FAMILIES:
        raise TypeError(f"no model class for config type {type(config).__name__}; register_family it first")
    _REGISTRY[name] = ModelSpec(name, config, description, preprocessing)


def config_classes() -> dict[str, type]:
    """Registered config classes by name ("ViTConfig" -> ViTConfig): what a flaxvision config.json may name."""
    return {cls.__name__: cls for cls in _FAMILIES}


def model_class(config: Any) -> type:
    """The module class that `build_model` instantiates for a config."""
    try:
        return _FAMILIES[type(config)].model_class
    except KeyError:
        raise ConfigError(f"no flaxvision model takes a {type(config).__name__}") from None


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


def name_of(config: Any) -> str:
    """The registered name with this config's architecture (sizes and training options aside), for messages.

    Example: `name_of(model_config("resnet18", num_classes=5))` -> "resnet18"; an unregistered architecture
    gives its family, e.g. "a ViT".
    """
    fields = [f.name for f in dataclasses.fields(config) if f.name not in RUN_FIELDS]
    for spec in _REGISTRY.values():
        if type(spec.config) is type(config) and all(getattr(spec.config, f) == getattr(config, f) for f in fields):
            return spec.name
    return f"a {type(config).__name__.removesuffix('Config')}"


def dtype_name(dtype: Any) -> str:
    """The config spelling of a dtype: "bfloat16" for jnp.bfloat16 or "bfloat16"."""
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
    changes: dict[str, Any] = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans).items() if v is not None}
    if dtype is not None:
        changes["dtype"] = dtype_name(dtype)
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
    family = _FAMILIES.get(type(config))
    if family is None:
        raise ConfigError(f"no flaxvision model takes a {type(config).__name__}")
    return Preprocessing(img_size=config.img_size, mean=family.mean, std=family.std).for_channels(config.in_chans)


def named_preprocessing(name: str, config: Any) -> Preprocessing:
    """The preprocessing a model built from registry `name` with `config` uses: the name's published one at the
    config's size and channels, else the family's default."""
    prep = get_model_spec(name).preprocessing
    if prep is None:
        return default_preprocessing(config)
    try:
        return dataclasses.replace(prep, img_size=config.img_size).for_channels(config.in_chans)
    except ConfigError:  # e.g. 3-channel statistics for a 2-channel model
        return default_preprocessing(config)


def build_model(
    config: Any,
    *,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
    label_names: Sequence[str] | None = None,
) -> Any:
    """Instantiate the model (a `flaxvision.models.Classifier`) for a config with fresh weights drawn from `seed`."""
    cls = model_class(config)
    if label_names is not None and len(label_names) != config.num_classes:
        raise ConfigError(f"{len(label_names)} label names for a model with num_classes={config.num_classes}")
    model = cls(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    model.preprocessing = preprocessing or default_preprocessing(config)
    model.label_names = tuple(label_names) if label_names is not None else None
    return model


def abstract_model(config: Any) -> Any:
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
