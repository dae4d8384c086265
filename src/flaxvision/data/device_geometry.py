"""Random crops and flips on the device, for images that live in memory at the model's size.

The host pipeline crops and flips each image while decoding it (data/transforms.py). When a dataset is small
enough to be decoded once and kept in memory as uint8 arrays (data/in_memory.py), decoding leaves the geometry out
and these functions draw it on the device instead, inside the jitted step, one draw per image from the step's key:

- "pad_crop": zero-pad by `pad` pixels and crop back at a random offset (the CIFAR recipe; as the host does it);
- "rrc": RandomResizedCrop from the stored image: an area fraction in `scale` and a log-uniform aspect ratio in
  `ratio`, the box clamped into the image (one draw instead of torchvision's ten tries), resampled bilinearly;
- "none": the stored image as it is.
A horizontal flip with probability 0.5 follows when `hflip`.

jax has no batched random crop, so the two crops are written here: pad_crop as one gather per batch, rrc with
`jax.image.scale_and_translate` vmapped over per-image boxes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flaxvision.errors import ConfigError

CROPS = ("none", "pad_crop", "rrc")


@dataclasses.dataclass(frozen=True)
class DeviceGeometry:
    """The random geometry a device stage applies to training images (hashable: a static part of the step)."""

    crop: str = "none"
    pad: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"DeviceGeometry: crop must be one of {', '.join(CROPS)}, got {self.crop!r}")

    @property
    def is_identity(self) -> bool:
        return self.crop == "none" and not self.hflip

    def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """Crop and flip a float (B, H, W, C) batch; the output has the input's shape."""
        k_crop, k_flip = jax.random.split(key)
        if self.crop == "pad_crop" and self.pad > 0:
            x = pad_crop(x, self.pad, k_crop)
        elif self.crop == "rrc":
            x = random_resized_crop(x, self.scale, self.ratio, k_crop)
        if self.hflip:
            flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flip, x[:, :, ::-1, :], x)
        return x


def pad_crop(x: jax.Array, pad: int, key: jax.Array) -> jax.Array:
    """Zero-pad each image by `pad` on every side and take an H x W window at a random offset in [0, 2 pad]."""
    batch, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * pad + 1)
    rows = offsets[:, 0, None] + jnp.arange(height)[None, :]  # (B, H)
    cols = offsets[:, 1, None] + jnp.arange(width)[None, :]  # (B, W)
    index = jnp.arange(batch)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def random_resized_crop(x: jax.Array, scale: tuple[float, float], ratio: tuple[float, float], key: jax.Array) -> jax.Array:
    """RandomResizedCrop of each image of a (B, H, W, C) batch back to H x W (bilinear)."""
    batch, height, width, channels = x.shape
    k_area, k_ratio, k_left, k_top = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (batch,), minval=scale[0], maxval=scale[1]) * (height * width)
    aspect = jnp.exp(jax.random.uniform(k_ratio, (batch,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1])))
    w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    left = jax.random.uniform(k_left, (batch,)) * (width - w)
    top = jax.random.uniform(k_top, (batch,)) * (height - h)
    # Output pixel coordinates are input coordinates * scale + translation: the box [left, left + w) fills [0, W).
    scales = jnp.stack([height / h, width / w], axis=-1)
    translations = -jnp.stack([top, left], axis=-1) * scales

    def one(image, s, t):
        return jax.image.scale_and_translate(image, (height, width, channels), (0, 1), s, t, method="linear",
                                             antialias=False)  # fmt: skip

    return jax.vmap(one)(x, scales, translations)
