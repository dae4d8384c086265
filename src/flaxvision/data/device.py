"""On-device preprocessing: uint8 batches in, normalised floats out, colour jitter included; call it inside jit.

The host ships uint8 images (4x fewer bytes than float32) and leaves the per-pixel arithmetic to the accelerator,
where it costs next to nothing next to the model.

    >>> @jax.jit
    ... def step(images_uint8, key):
    ...     x = flaxvision.data.device_preprocess(images_uint8, (0.5,) * 3, (0.5,) * 3, rng=key, brightness=0.2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL and torchvision use for grayscale


def _per_image(key: jax.Array, batch: int, strength: float) -> jax.Array:
    """Factors in [1 - strength, 1 + strength], shaped (B, 1, 1, 1) to scale NHWC images."""
    return jax.random.uniform(key, (batch, 1, 1, 1), minval=1.0 - strength, maxval=1.0 + strength)


def _gray(x: jax.Array) -> jax.Array:
    """(B, H, W, 1) luminance; written as three slices because a weighted reduction over a size-3 minor axis is
    several times slower on XLA:CPU."""
    if x.shape[-1] != 3:
        return x
    return x[..., 0:1] * _LUMA[0] + x[..., 1:2] * _LUMA[1] + x[..., 2:3] * _LUMA[2]


def _mean_gray(x: jax.Array) -> jax.Array:
    """(B, 1, 1, 1) mean luminance of each image, as one contraction (the fastest reduction on CPU and GPU)."""
    weights = jnp.asarray(_LUMA if x.shape[-1] == 3 else (1.0,) * x.shape[-1], x.dtype)
    level = jnp.einsum("bhwc,c->b", x, weights) / (x.shape[1] * x.shape[2])
    return level.reshape(-1, 1, 1, 1)


def device_preprocess(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    rng: jax.Array | None = None,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hflip: bool = False,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Jitter (optional) and normalise a uint8 NHWC batch: ((x / 255 after jitter) - mean) / std.

    Colour jitter follows torchvision's ColorJitter semantics, in a fixed order (brightness, contrast,
    saturation): brightness scales pixels, contrast blends with the image's mean gray level, saturation blends
    with the image's grayscale; each factor is drawn per image from [1 - s, 1 + s]; results are clipped to [0, 1].
    Jitter and `hflip` (a per-image horizontal flip with probability 0.5) need `rng`; without it they are skipped,
    so the same function serves training and eval.

    Args:
      images: uint8 (B, H, W, C) with C == len(mean).
      mean, std: per-channel normalisation of pixels in [0, 1].
      rng: a jax PRNG key for the random parts.
      brightness, contrast, saturation: jitter strengths in [0, 1).
      hflip: flip half of the images horizontally (the host pipeline already flips by default).
      dtype: output dtype (e.g. jnp.bfloat16 for a bf16 model).
    """
    if images.ndim != 4 or images.shape[-1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"device_preprocess: images of shape {images.shape} need C == len(mean) == len(std); "
            f"got mean {tuple(mean)} and std {tuple(std)}"
        )
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    batch = x.shape[0]
    if rng is not None:
        k_flip, k_bright, k_contrast, k_sat = jax.random.split(rng, 4)
        if hflip:
            flip = jax.random.bernoulli(k_flip, 0.5, (batch, 1, 1, 1))
            x = jnp.where(flip, x[:, :, ::-1, :], x)
        if brightness > 0:
            x = jnp.clip(x * _per_image(k_bright, batch, brightness), 0.0, 1.0)
        if contrast > 0:
            level = _mean_gray(x)
            x = jnp.clip(level + (x - level) * _per_image(k_contrast, batch, contrast), 0.0, 1.0)
        if saturation > 0 and x.shape[-1] == 3:
            gray = _gray(x)
            x = jnp.clip(gray + (x - gray) * _per_image(k_sat, batch, saturation), 0.0, 1.0)
    shape = (1, 1, 1, len(mean))
    mean_arr = jnp.asarray(mean, jnp.float32).reshape(shape)
    inv_std = 1.0 / jnp.asarray(std, jnp.float32).reshape(shape)
    return ((x - mean_arr) * inv_std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class DevicePreprocess:
    """`device_preprocess` bound to a model's mean/std and a loader's jitter; hashable, so usable as a static arg.

    A loader carries one (`loader.device_preprocess`): `x = loader.device_preprocess(batch["image"], key)`.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hflip: bool = False

    def __call__(self, images: jax.Array, rng: jax.Array | None = None, dtype: Any = jnp.float32) -> jax.Array:
        return device_preprocess(
            images, self.mean, self.std, rng=rng, brightness=self.brightness, contrast=self.contrast,
            saturation=self.saturation, hflip=self.hflip, dtype=dtype,
        )
