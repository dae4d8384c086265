"""Datasets that fit in memory: decoded once into uint8 arrays, batched by indexing, augmented on the device.

Small-image datasets (MNIST, CIFAR, the built-in digits) are cheap to hold decoded (60,000 x 28 x 28 is 47 MB) and
expensive to decode again every epoch: for a small model the PNG decoding, not the step, sets the pace. Here the
streaming pipeline (data.pipeline, with its workers and its bad-image handling) decodes every example once, at the
model's size; after that a batch is one fancy-indexing copy, and the random crop and flip are drawn on the device
(data.device_geometry) inside the jitted step.

`InMemoryLoader` behaves like `data.Loader`: the same example order (data.batches.epoch_order, so with no random
geometry the batches are identical), the same sharding of global batches over processes, the same resumable
(epoch, batch) state and skipped-image accounting. An image that cannot be decoded is left out of the arrays
(and reported), where the streaming loader replaces it with another each epoch.

    >>> loader = in_memory.load(source, preprocessing=model.preprocessing, batch_size=32, train=True,
    ...                         augment=AugmentConfig.cifar())
    >>> loader.device_geometry        # DeviceGeometry(crop="pad_crop", pad=4, hflip=True): for the device stage
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.data.batches import epoch_order
from flaxvision.data.device_geometry import DeviceGeometry
from flaxvision.data.image_source import ImageSource
from flaxvision.data.skipped import SkippedImages
from flaxvision.data.transforms import AugmentConfig, BadImage, open_image
from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.preprocessing import Preprocessing

_STATE_VERSION = 1
_DECODE_BATCH = 256


def decoded_bytes(source: ImageSource, preprocessing: Preprocessing) -> int:
    """Bytes of `source` decoded to uint8 at the model's size."""
    return len(source) * preprocessing.img_size**2 * preprocessing.channels


def host_only_reason(source: ImageSource, preprocessing: Preprocessing, augment: AugmentConfig | None) -> str | None:
    """Why this training augmentation needs the streaming pipeline (None: the device can do all of it).

    RandAugment, TrivialAugment and random erasing run only on the host. A random resized crop is cut from the
    stored image, so it is done in memory only when the images are no larger than the model's input (judged by
    the first one): cut from a downscaled copy, a crop of a large photo would lose resolution.
    """
    if augment is None:
        return None
    if augment.randaugment or augment.trivialaugment:
        return "RandAugment / TrivialAugment run on the host"
    if augment.reprob > 0:
        return "random erasing runs on the host"
    if augment.crop == "random_resized" and len(source):
        try:
            side = min(open_image(source[0]["image"]).size)
        except BadImage:
            return None
        if side > preprocessing.img_size:
            return f"random resized crops of {side}-pixel images are cut on the host at full resolution"
    return None


def device_geometry(augment: AugmentConfig | None) -> DeviceGeometry | None:
    """The crop and flip the device draws for images stored at the model's size (None for evaluation)."""
    if augment is None:
        return None
    crop = {"resize": "none", "pad_crop": "pad_crop", "random_resized": "rrc"}[augment.crop]
    return DeviceGeometry(crop=crop, pad=augment.pad, scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip)


def stored_preprocessing(preprocessing: Preprocessing, augment: AugmentConfig | None) -> Preprocessing:
    """The geometry images are kept in: the eval geometry, or for a random crop the whole image (as the host
    pipeline starts its pad-crop from)."""
    if augment is None or augment.crop == "resize":
        return preprocessing
    return dataclasses.replace(preprocessing, crop_pct=1.0, resize_mode="squash")


def load(source: ImageSource, *, preprocessing: Preprocessing, batch_size: int, train: bool, seed: int = 0,
         augment: AugmentConfig | None = None, workers: int = 0, shard_index: int = 0, shard_count: int = 1,
         progress: bool = True) -> InMemoryLoader:  # fmt: skip
    """Decode `source` once (with the streaming pipeline and `workers`) and return a loader over the arrays."""
    from flaxvision.data.pipeline import make_loader

    augment = (augment or AugmentConfig()) if train else None
    decoder = make_loader(source, preprocessing=stored_preprocessing(preprocessing, augment), batch_size=_DECODE_BATCH,
                          train=False, workers=workers)  # fmt: skip
    n, size, channels = len(source), preprocessing.img_size, preprocessing.channels
    images = np.empty((n, size, size, channels), np.uint8)
    labels, ids = np.empty(n, np.int32), np.empty(n, np.int64)
    kept, start = 0, time.perf_counter()
    try:
        for batch in decoder:
            keep = batch["mask"].astype(bool)
            count = int(keep.sum())
            images[kept:kept + count] = batch["image"][keep]
            labels[kept:kept + count], ids[kept:kept + count] = batch["label"][keep], batch["id"][keep]
            kept += count
    finally:
        decoder.close()
    if progress:
        print(f"flaxvision: {source.name}: {kept} images decoded into memory ({images[:kept].nbytes / 1e6:.0f} MB) in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)  # fmt: skip (stderr: stdout may be --json)
    return InMemoryLoader(images[:kept], labels[:kept], ids[:kept], source=source, bad_ids=decoder.skipped.ids,
                          preprocessing=preprocessing, batch_size=batch_size, train=train, seed=seed, augment=augment,
                          shard_index=shard_index, shard_count=shard_count)  # fmt: skip


def check_fits(sources: list[ImageSource], preprocessing: Preprocessing, max_gb: float) -> str | None:
    """None when the sources decoded fit under `max_gb` and half the machine's memory, else why not."""
    from flaxvision.host_memory import memory_limit_bytes  # (the machine's memory, cgroup limits included)

    need = sum(decoded_bytes(s, preprocessing) for s in sources)
    size = f"{need / 1e9:.1f} GB" if need >= 1e8 else f"{need / 1e6:.1f} MB"
    if need > max_gb * 1e9:
        return f"the data decodes to {size}, over --in-memory-max-gb {max_gb:g}"
    import jax

    machine = memory_limit_bytes(jax.devices("cpu")[0])
    if machine is not None and need > machine[0] / 2:
        return f"the data decodes to {size}, over half of {machine[1]} ({machine[0] / 1e9:.1f} GB)"
    return None


class InMemoryLoader:
    """Batches of one split held in memory; the interface of `data.Loader` (see the module docstring).

    Attributes:
      augment: the training AugmentConfig (None for evaluation); the device stage reads its colour jitter.
      device_geometry: the random crop and flip the device stage draws (None for evaluation).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, *, source: ImageSource,
                 bad_ids: list[int], preprocessing: Preprocessing, batch_size: int, train: bool, seed: int,
                 augment: AugmentConfig | None, shard_index: int, shard_count: int):  # fmt: skip
        if not 0 <= shard_index < shard_count:
            raise ConfigError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
        self.images, self.labels, self.ids = images, labels, ids
        self.source, self.preprocessing = source, preprocessing
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.augment = augment
        self.device_geometry = device_geometry(augment)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.global_batch_size = batch_size * shard_count
        self.skipped = SkippedImages(source)
        self.bad_ids = list(bad_ids)  # met while decoding: left out of the arrays, reported for every epoch
        per_epoch = len(labels) / self.global_batch_size
        self._batches_per_epoch = math.floor(per_epoch) if train else math.ceil(per_epoch)
        if self._batches_per_epoch == 0:
            raise FlaxvisionError(f"{source.name}: {len(labels)} usable examples make no full batch of "
                                  f"{self.global_batch_size}; lower the batch size")  # fmt: skip
        self._next_epoch = 0

    def __len__(self) -> int:
        return self._batches_per_epoch

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.source.class_names

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self) -> InMemoryIterator:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return InMemoryIterator(self, epoch)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.labels), epoch, seed=self.seed, shuffle=self.train,
                           global_batch_size=self.global_batch_size, batches=len(self))  # fmt: skip

    def batch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at these positions (-1: a blank, masked row)."""
        valid = positions >= 0
        safe = np.where(valid, positions, 0)
        images = self.images[safe]
        if not valid.all():
            images[~valid] = 0
        return {"image": images, "label": np.where(valid, self.labels[safe], 0).astype(np.int32), "mask": valid,
                "id": np.where(valid, self.ids[safe], -1).astype(np.int32)}  # fmt: skip

    def fingerprint(self) -> dict[str, Any]:
        return {"num_examples": len(self.labels), "global_batch_size": self.global_batch_size, "seed": self.seed,
                "train": self.train}  # fmt: skip

    def write_report(self, run_dir: str | os.PathLike) -> Path:
        return self.skipped.write_report(run_dir)

    def close(self) -> None:
        """Nothing to stop (the decoding workers are gone); kept for the loader interface."""


class InMemoryIterator:
    """One epoch of an `InMemoryLoader`: batch dicts as `data.Loader` yields them, with get_state / set_state."""

    def __init__(self, loader: InMemoryLoader, epoch: int):
        self.loader, self.epoch, self.batch = loader, epoch, 0
        self._order = loader.order(epoch)
        for example_id in loader.bad_ids:
            loader.skipped.add(epoch, int(example_id))

    def get_state(self) -> dict[str, Any]:
        skipped = {str(e): list(ids) for e, ids in self.loader.skipped.epochs.items()}
        return {"version": _STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "skipped": skipped,
                **self.loader.fingerprint()}  # fmt: skip

    def set_state(self, state: dict[str, Any]) -> None:
        from flaxvision.data.pipeline import check_fingerprint

        check_fingerprint(state, self.loader.fingerprint())
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self.loader.order(self.epoch)
        self.loader.skipped.epochs = {int(e): list(ids) for e, ids in state.get("skipped", {}).items()}
        self.loader.skipped.count = sum(len(ids) for ids in self.loader.skipped.epochs.values())

    def __iter__(self) -> InMemoryIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        loader = self.loader
        if self.batch >= len(loader):
            raise StopIteration
        size = loader.batch_size
        start = self.batch * loader.global_batch_size + loader.shard_index * size
        self.batch += 1
        return loader.batch(self._order[start:start + size])

    def close(self) -> None:
        pass
