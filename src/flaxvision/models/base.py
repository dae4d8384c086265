"""What every flaxvision classifier shares: the `ModelConfig` protocol, the `Classifier` base, parameter paths.

Generic code (the optimiser, the trainer, export, verify, the weight loader) asks the model's config for what it
needs instead of testing for one family:

    config.num_layers()                  # 12 for ViT-B: layer-wise lr decay and --train-only last:K; 0: no layers
    config.layer_index("blocks.3.mlp.fc1.kernel")   # 4: 0 = embeddings, i + 1 = block i, num_layers() + 1 = head
    config.position_grid()               # 14: patches per side of a learned position embedding (None: none)
    config.train_memory_bytes(32)        # device memory one training step needs, estimated from the config
    config.param_count(), config.forward_flops()

Which weight formats can hold a config is the weight layouts' business (`flaxvision.weights.layouts.export_formats`).
`ConfigBase` gives the defaults of a family without layers or position embeddings;
`require_layers` turns a missing capability into one error that names the model.

`check_common` (every config's `__post_init__` calls it first) checks every field against its declared type
(`int`, `float`, `bool`, `str`, `tuple[int, ...]`, `X | None`, `Literal[...]`) and, for the field names in
`FIELD_RANGES` (shared by the families: width, depth, num_heads ...), its range; then the parameter count. A
config from a malformed config.json (a string width, 0 heads, a 1e9 width, a NaN epsilon) is one ConfigError
before anything is built or allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError
from flaxvision.models.registry import name_of
from flaxvision.preprocessing import Preprocessing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# How a replaced classifier head starts: zeros (the ViT transfer recipe: predictions start uniform) or random.
HEAD_INITS = ("zeros", "random")


def param_path(path: Sequence[Any]) -> str:
    """The dotted name of a parameter from its nnx path: ("blocks", 0, "attn", "qkv", "kernel") -> "blocks.0.attn.qkv.kernel"."""
    return ".".join(str(p) for p in path)


@runtime_checkable
class ModelConfig(Protocol):
    """What generic code may ask of any model config (frozen dataclasses: ViTConfig, ResNetConfig, CNNConfig)."""

    num_classes: int
    img_size: int
    in_chans: int
    dtype: str

    def param_count(self) -> int: ...

    def forward_flops(self) -> int: ...

    def num_layers(self) -> int:
        """Repeated layers (encoder blocks) that layer-wise lr decay and `--train-only last:K` count; 0: none."""
        ...

    def layer_index(self, path: str) -> int:
        """Layer of a dotted parameter path, 0 (stem, embeddings) .. num_layers() + 1 (final norm, head)."""
        ...

    def position_grid(self) -> int | None:
        """Patches per side of a learned position embedding (resampled when img_size changes); None: none."""
        ...

    def position_prefix(self) -> int:
        """Leading entries of that position embedding that are not on the grid (a ViT's CLS position)."""
        ...

    def train_memory_bytes(self, batch_size: int, *, optimizer_slots: int = 2) -> int:
        """Device memory of one training step: parameters, gradients, optimizer state, saved activations.

        `batch_size` is the examples one device computes (per micro-batch with gradient accumulation); the
        parameter and optimizer part assumes they are replicated (divide it under FSDP).
        """
        ...


class ConfigBase:
    """Defaults of `ModelConfig` for a family without layers, position embeddings or foreign weight formats."""

    __slots__ = ()

    def num_layers(self) -> int:
        return 0

    def layer_index(self, path: str) -> int:
        raise ConfigError(f"{type(self).__name__} has no layers to index ({path}); check num_layers() first")

    def position_grid(self) -> int | None:
        return None

    def position_prefix(self) -> int:
        return 0


def require_layers(config: Any, option: str) -> int:
    """`config.num_layers()`, or a ConfigError naming the model when it has none (e.g. for layer_decay)."""
    layers = config.num_layers()
    if layers < 1:
        raise ConfigError(f"{option} needs a model with layers (a ViT's encoder blocks); {name_of(config)} has none")
    return layers


def train_step_bytes(params: int, optimizer_slots: int, activations: int) -> int:
    """A training step's memory: float32 parameters, `optimizer_slots` moments each (2 for AdamW, 1 for SGD with
    momentum), and while it runs the gradients and the updates, plus the activations (and inputs) it keeps."""
    return 4 * params * (3 + optimizer_slots) + activations


def compute_dtype(name: str) -> Any:
    """The JAX dtype for a config's `dtype` string."""
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field may take: low..high, each end closed unless `*_open`; None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""  # e.g. "(1 for grayscale, 3 for RGB)"

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self, integer: bool) -> str:
        """'an integer from 1 to 64', 'an integer >= 1', 'in [0, 1)'."""
        kind = "an integer " if integer else ""
        if self.low is not None and self.high is not None and integer:
            return f"{kind}from {self.low:g} to {self.high:g}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind}{'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind}{'<' if self.high_open else '<='} {self.high:g}"


# Ranges of config fields by name, whatever the family (a tuple field's range applies to each element). The upper
# bounds are generous but finite, so that a typo cannot allocate terabytes; fields not named here get type checks.
WIDTHS = Range(1, 65536)
DEPTHS = Range(1, 1024)
RATES = Range(0.0, 1.0, high_open=True)
EPSILONS = Range(0.0, 1.0, low_open=True)
FIELD_RANGES: dict[str, Range] = {
    "num_classes": Range(1),
    "img_size": Range(1, 8192),
    "patch_size": Range(1, 1024),
    "in_chans": Range(1, 64, hint=" (1 for grayscale, 3 for RGB)"),
    "width": WIDTHS, "hidden": WIDTHS, "stem_width": WIDTHS, "features": WIDTHS, "stage_widths": WIDTHS, "dims": WIDTHS,
    "mlp_dim": Range(1, 262144),
    "depth": DEPTHS, "stage_depths": DEPTHS, "depths": DEPTHS,
    "num_heads": Range(1, 1024),
    "dropout_rate": RATES, "attention_dropout_rate": RATES, "drop_path_rate": RATES,
    "layer_norm_eps": EPSILONS, "bn_eps": EPSILONS,
    "bn_momentum": Range(0.0, 1.0, low_open=True, high_open=True),
}  # fmt: skip
# No family builds a model this large (ViT-22B has 2.2e10 parameters): a larger count is a typo in a config.
MAX_PARAMS = 10**11


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> declared type of a config dataclass, resolved (`from __future__ import annotations` makes
    them strings); {} for a class whose annotations cannot be resolved (its fields are then not type-checked)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _expected(hint: Any) -> str:
    """'an integer', 'a tuple of integers' ... for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return f"a tuple of {len(args)} integers" if Ellipsis not in args else "a tuple of integers"
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    return {int: "an integer", float: "a finite number", bool: "True or False", str: "a string"}.get(hint, str(hint))


def check_field(kind: str, name: str, hint: Any, value: Any, bounds: Range | None = None) -> None:
    """Raise a ConfigError naming `kind.name` when `value` is not of the declared type `hint` or not in `bounds`.

    A bool is not accepted for an int (True == 1 in Python), nor an int for a bool; an int is a float; floats must
    be finite; a tuple's elements are checked one by one. Types this does not know (nested configs ...) pass.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return
        problems = []
        for member in members:
            try:
                return check_field(kind, name, member, value, bounds)
            except ConfigError as err:
                problems.append(str(err))
        if len(members) == 1:
            optional = len(members) < len(args)
            raise ConfigError(problems[0].replace(" must be ", " must be None or ", 1) if optional else problems[0])
        raise ConfigError(f"{kind}: {name} must be {' or '.join(_expected(m) for m in members)}, got {value!r}")
    wrong = ConfigError(f"{kind}: {name} must be {_expected(hint)}, got {value!r} ({type(value).__name__})")
    if origin is tuple:
        if not isinstance(value, tuple):
            raise wrong
        if Ellipsis in args:
            element_types = [args[0]] * len(value)
        elif len(value) == len(args):
            element_types = list(args)
        else:
            raise ConfigError(f"{kind}: {name} must be {_expected(hint)}, got {value!r} ({len(value)} values)")
        for i, (element_type, element) in enumerate(zip(element_types, value, strict=True)):
            check_field(kind, f"{name}[{i}]", element_type, element, bounds)
        return
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{kind}: {name} must be {_expected(hint)}, got {value!r}")
        return
    if hint is bool:
        if type(value) is not bool:
            raise wrong
    elif hint is str:
        if not isinstance(value, str):
            raise wrong
    elif hint is int or hint is float:
        integer = hint is int
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise wrong
        if not integer and not math.isfinite(value):
            raise ConfigError(f"{kind}: {name} must be a finite number, got {value!r}")
        if bounds is not None and value not in bounds:
            raise ConfigError(f"{kind}: {name} must be {bounds.describe(integer)}{bounds.hint}, got {value!r}")


def check_fields(config: Any) -> None:
    """Every field of a config dataclass against its declared type and, by name, `FIELD_RANGES`."""
    kind = type(config).__name__
    for name, hint in field_types(type(config)).items():
        check_field(kind, name, hint, getattr(config, name), FIELD_RANGES.get(name))


def check_param_count(config: Any) -> None:
    """Refuse a config whose parameter count is beyond any real model's (a typo such as width=655360)."""
    try:
        count = config.param_count()
    except (ArithmeticError, LookupError, TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        return  # an inconsistent config: the family's own checks, which follow, name the problem
    if count > MAX_PARAMS:
        raise ConfigError(
            f"{type(config).__name__}: {count:,} parameters ({count / 1e9:,.0f} billion) is beyond any model "
            f"flaxvision builds (at most {MAX_PARAMS:,}); check the sizes (width, depth, mlp_dim, img_size ...)"
        )


def check_common(config: Any) -> None:
    """Validate every field's type and range, the fields every model config has, and the parameter count; raise
    ConfigError naming the value and the fix. Called first by each config's `__post_init__`."""
    check_fields(config)
    kind = type(config).__name__
    if config.dtype not in DTYPES:
        raise ConfigError(f"{kind}: dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    check_param_count(config)


class Classifier(nnx.Module):
    """Base class of the model zoo. Subclasses set `config` and take NHWC float images."""

    config: Any
    family: ClassVar[str] = ""
    # Set by build_model / the weight loaders (static metadata, not parameters):
    preprocessing: Preprocessing  # how images become inputs; travels with the weights
    label_names: tuple[str, ...] | None = None  # class names in label order, when known

    def class_names(self) -> list[str]:
        """The label names in class order, or "0", "1", ... when the model has none."""
        return list(self.label_names) if self.label_names else [str(i) for i in range(self.config.num_classes)]

    def num_params(self) -> int:
        """Number of trainable parameters (nnx.Param leaves), e.g. 86,567,656 for ViT-B/16 with 1000 classes."""
        state = nnx.state(self, nnx.Param)
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    def gflops(self) -> float:
        """Forward GFLOPs for one image at the config's size (2 x multiply-adds of convolutions and matmuls)."""
        return self.config.forward_flops() / 1e9

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one input image."""
        return (self.config.img_size, self.config.img_size, self.config.in_chans)

    def check_input(self, x: jax.Array) -> None:
        """Raise a clear error when an input batch does not have the shape the model was built for."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"{type(self).__name__} expects images of shape (batch, {', '.join(map(str, self.input_shape))}) "
                f"(NHWC), got {tuple(x.shape)}; build the model with img_size/in_chans matching the data"
            )
