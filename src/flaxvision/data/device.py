"""The device stage: host batches onto the devices, and uint8 pixels into model inputs there.

`DeviceStage` is the one owner of everything between the host pipeline and the model: transfer with the batch
sharding (one data axis over every device of every process), prefetch (the next batches travel while a step runs),
padding of evaluation batches to one shape, normalisation and the on-device augmentation (colour jitter). Training,
evaluation, `predict` and the report all go through it, so what the report shows "after augmentation" is what the
model sees.

The host ships uint8 images (4x fewer bytes than float32) and leaves the per-pixel arithmetic to the accelerator,
where it costs next to nothing next to the model.

    >>> @jax.jit
    ... def step(images_uint8, key):
    ...     x = flaxvision.data.device_preprocess(images_uint8, (0.5,) * 3, (0.5,) * 3, rng=key, brightness=0.2)
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxvision.data.device_geometry import DeviceGeometry
from flaxvision.errors import FlaxvisionError
from flaxvision.preprocessing import Preprocessing

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
    images: jax.Array | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    rng: jax.Array | None = None,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hflip: bool = False,
    geometry: DeviceGeometry | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Crop, flip and jitter (optional) and normalise a uint8 NHWC batch: ((x / 255 after jitter) - mean) / std.

    Colour jitter follows torchvision's ColorJitter semantics, in a fixed order (brightness, contrast,
    saturation): brightness scales pixels, contrast blends with the image's mean gray level, saturation blends
    with the image's grayscale; each factor is drawn per image from [1 - s, 1 + s]; results are clipped to [0, 1].
    Jitter and `hflip` (a per-image horizontal flip with probability 0.5) need `rng`; without it they are skipped,
    so the same function serves training and eval.

    Args:
      images: uint8 (B, H, W, C) with C == len(mean), a jax or a numpy array.
      mean, std: per-channel normalisation of pixels in [0, 1].
      rng: a jax PRNG key for the random parts.
      brightness, contrast, saturation: jitter strengths in [0, 1).
      hflip: flip half of the images horizontally (the host pipeline already flips by default).
      geometry: random crop and flip drawn on the device (images kept in memory at the model's size; see
        data.device_geometry), before the jitter; needs `rng`.
      dtype: output dtype (e.g. jnp.bfloat16 for a bf16 model).
    """
    if images.ndim != 4 or images.shape[-1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"device_preprocess: images of shape {images.shape} need C == len(mean) == len(std); "
            f"got mean {tuple(mean)} and std {tuple(std)}"
        )
    x = jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)
    batch = x.shape[0]
    if rng is not None:
        if geometry is not None and not geometry.is_identity:  # (its own stream: the jitter's draws stay as they are)
            x = geometry(x, jax.random.fold_in(rng, 7))
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
    geometry: DeviceGeometry | None = None

    def __call__(self, images: jax.Array | np.ndarray, rng: jax.Array | None = None, dtype: Any = jnp.float32) -> jax.Array:
        return device_preprocess(
            images, self.mean, self.std, rng=rng, brightness=self.brightness, contrast=self.contrast,
            saturation=self.saturation, hflip=self.hflip, geometry=self.geometry, dtype=dtype,
        )


Batch = dict[str, Any]


def as_batch(batch: Any) -> dict[str, np.ndarray]:
    """A batch from any source as {"image", "label"[, "mask"]} numpy arrays ((image, label) tuples too)."""
    if isinstance(batch, dict):
        return {k: np.asarray(v) for k, v in batch.items() if k in ("image", "label", "mask")}
    return {"image": np.asarray(batch[0]), "label": np.asarray(batch[1])}


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad an evaluation batch to `size` rows with a False `mask`, so every batch has one shape (one compilation)."""
    n = len(batch["label"])
    mask = batch.get("mask", np.ones(n, bool)).astype(bool)
    if n == size:
        return {**batch, "mask": mask}
    if n > size:
        raise FlaxvisionError(f"an evaluation batch has {n} examples, more than the batch size {size}; lower the data's batch size")
    pad = lambda x: np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
    return {"image": pad(batch["image"]), "label": pad(batch["label"]), "mask": pad(mask)}


class DeviceStage:
    """Host batches -> sharded device arrays -> model inputs, for one model's preprocessing.

    Args:
      preprocessing: the model's mean/std (and size, for the report's pictures).
      devices: the devices of the data axis (default: every device of every process).
      jitter: the on-device colour jitter of training batches (an AugmentConfig's brightness, contrast, saturation;
        None: none). Evaluation never jitters.
      dtype: the model's compute dtype.
      geometry: the random crop and flip of training batches drawn here rather than on the host (a
        data.device_geometry.DeviceGeometry, from an in-memory loader's `device_geometry`; None: the host did them).
      preprocess: a custom `(images, key_or_None) -> inputs` that replaces jitter + normalisation.

    Inside jit: `stage.train_inputs(images, key)`, `stage.eval_inputs(images)`. On the host: `stage.put(batch)`,
    `stage.prefetch(items)`, `stage.pad(batch)` (to the local share of `batch_size`).
    """

    def __init__(self, preprocessing: Preprocessing, *, devices: Sequence[Any] | None = None, jitter: Any = None,
                 dtype: Any = "float32", preprocess: Callable[..., jax.Array] | None = None,
                 geometry: DeviceGeometry | None = None):
        self.preprocessing = preprocessing
        self.mesh = Mesh(np.asarray(list(devices or jax.devices())), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.group_sharding = NamedSharding(self.mesh, PartitionSpec(None, "data"))  # (K, B, ...): K steps' batches
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.dtype = jnp.dtype(dtype)
        self.custom = preprocess
        strengths = (getattr(jitter, "brightness", 0.0), getattr(jitter, "contrast", 0.0), getattr(jitter, "saturation", 0.0))
        self.geometry = geometry
        self.train_fn = DevicePreprocess(tuple(preprocessing.mean), tuple(preprocessing.std), *strengths, geometry=geometry)
        self.eval_fn = DevicePreprocess(tuple(preprocessing.mean), tuple(preprocessing.std))

    @property
    def device_count(self) -> int:
        return self.mesh.devices.size

    # ---- inside jit -------------------------------------------------------------------------------------------
    def train_inputs(self, images: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.custom is not None:
            return self.custom(images, key)
        if images.dtype != jnp.uint8:  # already-normalised floats pass through
            return images.astype(self.dtype)
        return self.train_fn(images, key, self.dtype)

    def eval_inputs(self, images: jax.Array) -> jax.Array:
        if self.custom is not None:
            return self.custom(images, None)
        if images.dtype != jnp.uint8:
            return images.astype(self.dtype)
        return self.eval_fn(images, None, self.dtype)

    # ---- host side --------------------------------------------------------------------------------------------
    def put(self, batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows of a global batch -> one array per key, sharded over the data axis."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in batch.items()}

    def put_group(self, group: dict[str, np.ndarray]) -> Batch:
        """K stacked batches (K, local B, ...) -> arrays sharded over the data axis along B, for K steps in one call."""
        return {k: jax.make_array_from_process_local_data(self.group_sharding, np.asarray(v)) for k, v in group.items()}

    def put_replicated(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def prefetch(self, items: Iterable[tuple[Any, Any]], size: int = 2,
                 put: Callable[[Any, Any], Any] | None = None) -> Iterator[tuple[Any, Any]]:  # fmt: skip
        """Keep `size` batches on the devices, the current one and the next, while steps run (device_put is
        asynchronous): the source is read `size - 1` batches ahead of the step.

        Items are (batch, tag) pairs; the tag (e.g. the data position after the batch) travels with its batch.
        `put(batch, tag)` moves one to the devices (default: `self.put(batch)`).
        """
        queue: collections.deque[tuple[Any, Any]] = collections.deque()
        for batch, tag in items:
            queue.append((put(batch, tag) if put is not None else self.put(batch), tag))
            if len(queue) >= size:
                yield queue.popleft()
        yield from queue

    def local_batch_size(self, global_batch_size: int) -> int:
        return global_batch_size // jax.process_count()

    def pad(self, batch: Any, global_batch_size: int) -> dict[str, np.ndarray]:
        """An evaluation batch (any form) padded to this process's share of `global_batch_size`."""
        return pad_batch(as_batch(batch), self.local_batch_size(global_batch_size))

    def show(self, images: np.ndarray, key: jax.Array) -> np.ndarray:
        """uint8 training images as the model sees them after the on-device augmentation (for the report)."""
        if images.dtype != np.uint8:
            pre = self.preprocessing
            return np.clip((images * np.asarray(pre.std) + np.asarray(pre.mean)) * 255.0, 0, 255).astype(np.uint8)
        inputs = np.asarray(jax.jit(self.train_inputs)(jnp.asarray(images), key), np.float32)
        pre = self.preprocessing
        pixels = (inputs * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)) * 255.0
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
