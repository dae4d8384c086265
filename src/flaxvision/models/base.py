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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

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


def check_common(config: Any) -> None:
    """Validate the fields every model config has; raise ConfigError naming the value and the fix."""
    kind = type(config).__name__
    if not isinstance(config.num_classes, int) or config.num_classes < 1:
        raise ConfigError(f"{kind}: num_classes must be an integer >= 1, got {config.num_classes!r}")
    if not isinstance(config.in_chans, int) or not 1 <= config.in_chans <= 64:
        raise ConfigError(
            f"{kind}: in_chans must be an integer from 1 to 64 (1 for grayscale, 3 for RGB), "
            f"got {config.in_chans!r}"
        )
    if not isinstance(config.img_size, int) or config.img_size < 1:
        raise ConfigError(f"{kind}: img_size must be a positive integer, got {config.img_size!r}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"{kind}: dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")


class Classifier(nnx.Module):
    """Base class of the model zoo. Subclasses set `config` and take NHWC float images."""

    config: Any
    family: ClassVar[str] = ""
    # Set by build_model / the weight loaders (static metadata, not parameters):
    preprocessing: Preprocessing  # how images become inputs; travels with the weights
    label_names: tuple[str, ...] | None = None  # class names in label order, when known

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
