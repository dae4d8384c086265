"""The grain pipeline: an `ImageSource` to uint8 batches on the device, deterministic, resumable, robust.

    >>> data = flaxvision.data.load("ethz/food101", classes=20)
    >>> loader = flaxvision.data.make_loader(data.train, preprocessing=model.preprocessing, batch_size=32,
    ...                                      train=True, seed=0, workers=4)
    >>> for epoch in range(3):
    ...     loader.set_epoch(epoch)
    ...     it = iter(loader)                  # one epoch of batches
    ...     for batch in it:                   # {"image": uint8 (32, 224, 224, 3), "label": int32, "mask": bool}
    ...         x = loader.device_preprocess(batch["image"], key)   # inside the jitted step: jitter + normalise
    ...         state = it.get_state()         # save with a checkpoint; it.set_state(state) resumes exactly

How it stays deterministic: batch b of epoch e is a pure function of (seed, e, b). The example order is a
permutation seeded by (seed, epoch), cut into global batches of `batch_size x shard_count` examples; process
`shard_index` reads only its contiguous slice of each global batch, so the processes' batches concatenated in
process order are exactly the batch one process would read with the global batch size. The augmentation of an
example comes from an RNG seeded by (seed, batch number, row in the global batch), so it does not depend on the
process count either. grain splits the stream of batch numbers across its worker processes, so each worker
builds whole batches and the order does not depend on the number of workers. The iterator state is therefore
just (epoch, batch) (plus the skipped-image log), the same in every process: a resumed run, with any number of
workers and any number of processes (same global batch), gets exactly the batches it would have seen.

Workers are spawned processes (grain `mp_prefetch`). A plain script that uses them needs the usual
`if __name__ == "__main__":` guard. Workers never touch an accelerator: they force JAX onto the CPU before any
dataset code runs, and the code they run (sources, transforms, this module's decoder) never calls jax.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.data.device import DevicePreprocess
from flaxvision.data.sources import ImageSource
from flaxvision.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    AugmentConfig,
    BadImage,
    ImageOptions,
    decode_eval,
    decode_train,
    probe_image,
)
from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.preprocessing import Preprocessing

log = logging.getLogger("flaxvision.data")

_REPLACEMENT_TRIES = 8  # a training image that cannot be decoded is replaced by one of up to 8 random others
_STATE_VERSION = 1
REPORT_FILE = "skipped_images.json"


# --------------------------------------------------------------------------------------------------------------
# Worker side: batch number -> decoded batch. Pickled into every worker process.


class _BatchMaker:
    """Batch number g (of the endless stream) -> {"image", "label", "mask", "id", "skipped"} numpy arrays.

    Runs in the worker processes. Everything a batch holds is a function of (seed, g) alone: the epoch's example
    order comes from a permutation seeded by (seed, epoch), each example's augmentation from an RNG seeded by
    (seed, g, its row in the global batch). This process reads rows [shard_index x batch_size, + batch_size) of
    each global batch of batch_size x shard_count examples, and nothing else.
    Images are decoded straight into the batch array (no per-example objects, no stacking copy).

    A training image that cannot be used is replaced by a random other one (drawn from the batch's RNG, so
    deterministically); an eval image that cannot be used becomes a masked row, so that eval still covers every
    other example exactly once. Either way "skipped" carries the unusable example's id (else -1).
    """

    def __init__(self, source: ImageSource, options: ImageOptions, augment: AugmentConfig | None, *,
                 batch_size: int, batches_per_epoch: int, seed: int, shuffle: bool, shard_index: int,
                 shard_count: int):
        self.source = source
        self.options = options
        self.augment = augment
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle = shuffle
        self.shard = (shard_index, shard_count)
        self._order: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_order": None}

    def order(self, epoch: int) -> np.ndarray:
        """Source positions of every process's examples in `epoch` (the global order), padded with -1 to whole
        global batches (eval: in order, every example once; training: a permutation, the remainder dropped)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        n = len(self.source)
        positions = np.arange(n, dtype=np.int64)
        if self.shuffle and self.augment is not None:
            positions = np.random.default_rng([self.seed, epoch]).permutation(n)
        padded = np.full(self.batches_per_epoch * self.batch_size * self.shard[1], -1, np.int64)
        kept = min(len(positions), len(padded))
        padded[:kept] = positions[:kept]
        self._order = (epoch, padded)
        return padded

    def rows(self, g: int) -> tuple[np.ndarray, int]:
        """(source positions of this process's rows of batch g, row of the first one in the global batch)."""
        epoch, b = divmod(int(g), self.batches_per_epoch)
        (index, count), size = self.shard, self.batch_size
        first = index * size
        start = b * size * count + first
        return self.order(epoch)[start:start + size], first

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        g = int(g)
        positions, first_row = self.rows(g)
        size, channels, batch = self.options.size, self.options.channels, self.batch_size
        out = {
            "image": np.zeros((batch, size, size, channels), np.uint8),
            "label": np.zeros(batch, np.int32),
            "mask": np.zeros(batch, np.bool_),
            "id": np.full(batch, -1, np.int32),
            "skipped": np.full(batch, -1, np.int64),
        }
        for row, position in enumerate(positions.tolist()):
            if position < 0:
                continue  # padding: a blank, masked row
            rng = np.random.default_rng([self.seed, g, first_row + row]) if self.augment is not None else None
            candidates = [position]
            if rng is not None:
                candidates += rng.integers(len(self.source), size=_REPLACEMENT_TRIES).tolist()
            for candidate in candidates:
                try:
                    out["image"][row] = self._decode(candidate, rng)
                except BadImage:
                    if candidate == position:
                        out["skipped"][row] = self.source.ids[position]
                    continue
                out["label"][row] = self.source.labels[candidate]
                out["id"][row] = self.source.ids[candidate]
                out["mask"][row] = True
                break
        return out

    def _decode(self, position: int, rng: np.random.Generator | None) -> np.ndarray:
        data = self.source[position]["image"]
        if self.augment is None:
            return decode_eval(data, self.options)
        return decode_train(data, self.options, self.augment, rng)


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Runs first in every grain worker process: JAX there may only ever see the CPU."""
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None:  # imported by the spawn bootstrap (the parent's __main__); backends are not up yet
        jax.config.update("jax_platforms", "cpu")


def _mark_absl_flags_parsed() -> None:
    """grain reads absl flags in its workers; a script or CLI that does not use absl.app never parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------------------------------------------
# Skipped-image accounting (main process)


@dataclasses.dataclass
class SkippedImages:
    """Unusable images met by a loader: their ids per epoch (for an eval loader, per pass over the data)."""

    source: ImageSource
    epochs: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    count: int = 0  # occurrences, counting an image again in each epoch it was met

    @property
    def ids(self) -> list[int]:
        """Sorted ids of every image skipped so far."""
        return sorted({i for ids in self.epochs.values() for i in ids})

    def add(self, epoch: int, example_id: int) -> None:
        seen = self.epochs.setdefault(epoch, [])
        if example_id not in seen:
            seen.append(example_id)
            self.count += 1

    def reason(self, example_id: int) -> str:
        """Why this image is unusable (decoded again in this process: it is rare and only for the report)."""
        positions = np.flatnonzero(self.source.ids == example_id)
        if not len(positions):
            return "unknown id"
        try:
            probe_image(self.source[int(positions[0])]["image"])
        except BadImage as err:
            return str(err)
        return "decoded at report time (an intermittent read failure?)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.source.name,
            "count": self.count,
            "epochs": {
                str(epoch): [{"id": i, "where": self.source.describe(i), "reason": self.reason(i)} for i in ids]
                for epoch, ids in sorted(self.epochs.items())
            },
        }

    def write_report(self, run_dir: str | os.PathLike) -> Path:
        """Write `skipped_images.json` (ids, locations and reasons per epoch) into `run_dir`; return its path."""
        path = Path(run_dir) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


# --------------------------------------------------------------------------------------------------------------
# The loader


class Loader:
    """Batches of one split. `for batch in loader` runs `num_epochs` epochs (one by default); build it with
    `make_loader`.

    Each `iter(loader)` continues with the next epoch (or the one given to `set_epoch`); the worker processes and
    the device prefetch carry on from one epoch to the next, so an epoch boundary costs nothing.
    """

    def __init__(self, source: ImageSource, options: ImageOptions, *, batch_size: int, train: bool, seed: int,
                 num_epochs: int | None, shuffle: bool, drop_remainder: bool, augment: AugmentConfig | None,
                 workers: int, threads: int, shard_index: int, shard_count: int, to_device: bool, sharding: Any,
                 prefetch: int, device_preprocess: DevicePreprocess):
        self.source = source
        self.options = options
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.augment = augment
        self.workers = workers
        self.threads = threads
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.to_device = to_device
        self.sharding = sharding
        self.prefetch = prefetch
        self.device_preprocess = device_preprocess
        self.skipped = SkippedImages(source)
        n = len(source)
        # Every process runs the same number of (jitted, collective) steps: whole global batches of
        # batch_size x shard_count examples; the last one is dropped (training) or padded with masked rows (eval).
        self.global_batch_size = batch_size * shard_count
        per_epoch = n / self.global_batch_size
        self._batches_per_epoch = math.floor(per_epoch) if drop_remainder else math.ceil(per_epoch)
        if self._batches_per_epoch == 0:
            raise FlaxvisionError(
                f"{source.name}: {n} examples make no full batch of {self.global_batch_size}"
                + (f" ({batch_size} per process x {shard_count} processes)" if shard_count > 1 else "")
                + "; lower the batch size or pass drop_remainder=False"
            )
        self._next_epoch = 0
        self._stream: _Stream | None = None

    def __len__(self) -> int:
        """Batches per epoch (for this process)."""
        return self._batches_per_epoch

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.source.class_names

    @property
    def num_batches(self) -> int | None:
        """Batches that one `iter(loader)` yields: len(self) x num_epochs, or None when it repeats forever."""
        return None if self.num_epochs is None else len(self) * self.num_epochs

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter(loader)` start at this epoch (training order and augmentation depend on it)."""
        self._next_epoch = int(epoch)

    def __iter__(self) -> LoaderIterator:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + (self.num_epochs or 0)
        return LoaderIterator(self, epoch * len(self))

    def write_report(self, run_dir: str | os.PathLike) -> Path:
        """Write the skipped-images report (see `SkippedImages.write_report`)."""
        return self.skipped.write_report(run_dir)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _fingerprint(self) -> dict[str, Any]:
        """What a saved position depends on. Not the process count: (epoch, batch) count global batches, so a
        state saved by any number of processes resumes in any other with the same global batch size."""
        return {"num_examples": len(self.source), "global_batch_size": self.global_batch_size, "seed": self.seed,
                "train": self.train}

    def _stream_at(self, position: int) -> _Stream:
        if self._stream is None:
            self._stream = _Stream(self)
        self._stream.seek(position)
        return self._stream

    def batches(self) -> Any:
        """The endless stream of numpy batches as a grain MapDataset: epoch e, batch b is `batches()[e * len + b]`.

        Batch g is a pure function of (seed, g): that is what makes the order independent of the worker count and
        a resumed run identical to an uninterrupted one.
        """
        import grain

        maker = _BatchMaker(
            self.source, self.options, self.augment, batch_size=self.batch_size, batches_per_epoch=len(self),
            seed=self.seed, shuffle=self.shuffle, shard_index=self.shard_index, shard_count=self.shard_count,
        )
        return grain.MapDataset.range(0, sys.maxsize).map(maker)


class _Stream:
    """The loader's running pipeline: grain iterator (+ worker processes) and the batches prefetched to the device.

    It keeps running across epochs; `seek` restarts it only when asked for a batch other than the next one.
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        self.position = 0  # global index of the batch `take` returns next
        self._host: Any = None
        self._queue: collections.deque[tuple[dict[str, Any], np.ndarray]] = collections.deque()

    def seek(self, position: int) -> None:
        if position != self.position or self._host is None:
            self.close()
            self.position = position

    def take(self) -> tuple[dict[str, Any], np.ndarray]:
        if self._host is None:
            self._start()
        while len(self._queue) <= self.loader.prefetch:
            batch = next(self._host)
            skipped = batch.pop("skipped")
            self._queue.append((self._put(batch), skipped[skipped >= 0]))
        self.position += 1
        return self._queue.popleft()

    def _start(self) -> None:
        import grain

        ds = self.loader.batches()[self.position:]
        threads = self.loader.threads
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads)))
        if self.loader.workers > 0:
            _mark_absl_flags_parsed()
            options = grain.MultiprocessingOptions(num_workers=self.loader.workers, per_worker_buffer_size=2)
            ds = ds.mp_prefetch(options, worker_init_fn=_worker_init)
        self._host = iter(ds)

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.loader.to_device:  # out of grain's shared memory into ordinary arrays the caller may keep
            return {k: np.array(v) for k, v in batch.items()}
        import jax

        sharding = self.loader.sharding
        devices = sharding.device_set if sharding is not None else {jax.devices()[0]}
        if self.loader.workers and any(d.platform == "cpu" for d in devices):
            # A CPU "device" may alias the page-aligned shared-memory buffer instead of copying it, which would pin
            # grain's segment for as long as the batch lives: copy it out so the segment is released now.
            batch = {k: np.array(v) for k, v in batch.items()}
        if sharding is None:
            return jax.device_put(batch)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def close(self) -> None:
        if self._host is not None and hasattr(self._host, "close"):
            self._host.close()
        self._host = None
        self._queue.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class LoaderIterator:
    """Yields batch dicts {"image": uint8 (B, H, W, C), "label": int32 (B,), "mask": bool (B,), "id": int32 (B,)}.

    `mask` is False for padding rows (the last eval batch, or the last training batch with drop_remainder=False)
    and for eval images that could not be decoded. `id` is each example's row in its split (see
    `ImageSource.describe`), -1 on masked rows. Arrays are on the device (or laid out by `loader.sharding`) unless
    the loader was made with to_device=False.
    """

    def __init__(self, loader: Loader, start: int):
        self.loader = loader
        self._position = start  # global index of the next batch
        self._end = None if loader.num_epochs is None else start + loader.num_batches
        self._reported_epoch = start // len(loader) - 1

    # -- state ------------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable state: save it with the checkpoint and pass it to `set_state` to resume."""
        epoch, batch = divmod(self._position, len(self.loader))
        skipped = {str(e): list(ids) for e, ids in self.loader.skipped.epochs.items()}
        return {"version": _STATE_VERSION, "epoch": epoch, "batch": batch, "skipped": skipped,
                **self.loader._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a state of `get_state` (of a loader over the same data, batch size, seed and sharding).

        The iterator then yields the rest of that state's epoch (and the following ones, for num_epochs > 1).
        """
        if "global_batch_size" not in state and "shard" in state:  # states written before the key existed
            state = {**state, "global_batch_size": int(state["batch_size"]) * int(state["shard"][1])}
        for key, value in self.loader._fingerprint().items():
            saved = state.get(key)
            if (list(saved) if isinstance(saved, (list, tuple)) else saved) != value:
                raise FlaxvisionError(
                    f"cannot resume the data iterator: the checkpoint was saved with {key}={saved!r}, this loader "
                    f"has {key}={value!r}; use the same dataset, global batch size and seed"
                )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        self._position = epoch * len(self.loader) + batch
        if self.loader.num_epochs is not None:
            self._end = (epoch + self.loader.num_epochs) * len(self.loader)
        self.loader.skipped.epochs = {int(e): list(ids) for e, ids in state.get("skipped", {}).items()}
        self.loader.skipped.count = sum(len(ids) for ids in self.loader.skipped.epochs.values())
        self._reported_epoch = epoch - 1

    # -- iteration --------------------------------------------------------------------------------------------

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        epoch = self._position // len(self.loader)
        if epoch > self._reported_epoch + 1:
            self._end_of_epoch(epoch - 1)
        if self._end is not None and self._position >= self._end:
            self._end_of_epoch(epoch - 1)
            raise StopIteration
        batch, skipped = self.loader._stream_at(self._position).take()
        for example_id in skipped:
            self.loader.skipped.add(epoch, int(example_id))
        self._position += 1
        return batch

    def _end_of_epoch(self, epoch: int) -> None:
        if epoch <= self._reported_epoch:
            return
        self._reported_epoch = epoch
        ids = self.loader.skipped.epochs.get(epoch, [])
        if ids:
            shown = ", ".join(self.loader.source.describe(i) for i in ids[:5])
            more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
            log.warning("epoch %d: skipped %d unusable image(s) of %s: %s%s", epoch, len(ids),
                        self.loader.source.name, shown, more)

    def close(self) -> None:
        """Stop the loader's worker processes now (the next batch starts them again)."""
        self.loader.close()


def make_loader(
    source: ImageSource,
    *,
    preprocessing: Preprocessing,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = 1,
    workers: int = 0,
    threads: int | None = None,
    augment: AugmentConfig | None = None,
    shuffle: bool | None = None,
    drop_remainder: bool | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    shard_options: Any = None,
    draft: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    to_device: bool = True,
    sharding: Any = None,
    prefetch: int = 2,
) -> Loader:
    """A loader of uint8 batches for a model with this `preprocessing`.

    Args:
      source: a split from `flaxvision.data.load`.
      preprocessing: the model's `Preprocessing` (size, channels, eval resize/crop, interpolation, mean/std).
      batch_size: examples per batch (per process).
      train: training (shuffle, random augmentation, drop the last partial batch) or eval (in order, every
        example exactly once, the last batch padded with `mask` False rows).
      seed: seed of the shuffle and the augmentation: the same seed gives the same batches.
      num_epochs: epochs that one `for batch in loader` yields (1: one epoch per iteration, as a trainer's epoch
        loop wants; each new iteration continues with the next epoch); None: one endless iteration.
      workers: worker processes (0 decodes in this process, with `threads` threads).
      threads: decoding threads per process (default: the CPU count without workers, 1 with them).
      augment: training augmentation (default `AugmentConfig()`: RandomResizedCrop 0.7-1.0, flip, jitter 0.2).
      shuffle: default True for training, False for eval.
      drop_remainder: default True for training, False for eval (padded instead).
      shard_index, shard_count: this process's share of the data (default: jax.process_index() / process_count()
        when `to_device`, else 0 / 1); `shard_options` (a grain ShardOptions, e.g. ShardByJaxProcess()) also works.
      draft: decode JPEGs at a reduced size when the crop keeps enough pixels.
      max_image_pixels: images with more pixels (by their header) are skipped as decompression bombs.
      to_device: put batches on the device (default device, or `sharding`); False yields numpy arrays.
      sharding: a jax Sharding for the global batch (multi-device / multi-host data parallelism).
      prefetch: batches kept in flight on the device ahead of the consumer.

    Raises:
      FlaxvisionError: a value the pipeline cannot use (batch size, channels, shard, ...).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if preprocessing.channels not in (1, 3):
        raise ConfigError(
            f"the data pipeline makes 1- or 3-channel images; this model's preprocessing has {preprocessing.channels}"
        )
    if shard_options is not None:
        shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
    if shard_index is None or shard_count is None:
        if to_device:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        else:
            shard_index, shard_count = 0, 1
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    augment = (augment or AugmentConfig()) if train else None
    options = ImageOptions(
        size=preprocessing.img_size,
        channels=preprocessing.channels,
        crop_pct=preprocessing.crop_pct,
        resize_mode=preprocessing.resize_mode,
        interpolation=preprocessing.interpolation,
        draft=draft,
        max_image_pixels=max_image_pixels,
    )
    jitter = (augment.brightness, augment.contrast, augment.saturation) if augment else (0.0, 0.0, 0.0)
    device_fn = DevicePreprocess(tuple(preprocessing.mean), tuple(preprocessing.std), *jitter)
    if threads is None:
        threads = 1 if workers else min(8, os.cpu_count() or 1)
    return Loader(
        source, options, batch_size=batch_size, train=train, seed=seed, num_epochs=num_epochs,
        shuffle=train if shuffle is None else shuffle,
        drop_remainder=train if drop_remainder is None else drop_remainder,
        augment=augment, workers=workers, threads=max(0, threads), shard_index=shard_index,
        shard_count=shard_count, to_device=to_device, sharding=sharding, prefetch=max(0, prefetch),
        device_preprocess=device_fn,
    )
