"""What every flaxvision classifier shares: a frozen config, a parameter count and a FLOP count."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError
from flaxvision.preprocessing import Preprocessing

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
