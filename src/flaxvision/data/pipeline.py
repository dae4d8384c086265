"""The grain pipeline: an `ImageSource` to uint8 numpy batches on the host, deterministic, resumable, robust.

    >>> data = flaxvision.data.load("ethz/food101", classes=20)
    >>> loader = flaxvision.data.make_loader(data.train, preprocessing=model.preprocessing, batch_size=32,
    ...                                      train=True, seed=0, workers=4)
    >>> for epoch in range(3):
    ...     loader.set_epoch(epoch)
    ...     it = iter(loader)                  # one epoch of batches
    ...     for batch in it:                   # numpy {"image": uint8 (32, 224, 224, 3), "label": int32, ...}
    ...         ...                            # the device stage (data/device.py) moves, jitters, normalises
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

The loader is host-only: batches are plain numpy arrays that the caller owns. Putting them on the device,
sharding, device prefetch and the on-device jitter + normalisation belong to the device stage
(`flaxvision.data.device`); `loader.augment` records the jitter/flip settings that stage reads.

Workers are spawned processes (grain `mp_prefetch`). A plain script that uses them needs the usual
`if __name__ == "__main__":` guard. Workers never touch an accelerator: they force JAX onto the CPU before any
dataset code runs, and the code they run (sources, transforms, `batches`) never calls jax. Their batches come
through shared memory; `Loader.close()`, which also runs at interpreter exit, stops them and releases it all.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from flaxvision.data.batches import BatchMaker
from flaxvision.data.image_source import ImageSource
from flaxvision.data.skipped import REPORT_FILE, SkippedImages
from flaxvision.data.stream import Stream
from flaxvision.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, AugmentConfig
from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.preprocessing import Preprocessing

__all__ = ["REPORT_FILE", "Loader", "LoaderIterator", "SkippedImages", "make_loader"]

log = logging.getLogger("flaxvision.data")

_STATE_VERSION = 1
_BatchMaker = BatchMaker  # the name tests/distributed_child.py patches


# --------------------------------------------------------------------------------------------------------------
# The loader


class Loader:
    """Batches of one split. `for batch in loader` runs `num_epochs` epochs (one by default); build it with
    `make_loader`.

    Each `iter(loader)` continues with the next epoch (or the one given to `set_epoch`); the worker processes and
    their prefetched batches carry on from one epoch to the next, so an epoch boundary costs nothing.
    `close()` (or leaving `with loader:`) stops the workers; it also happens at interpreter exit.

    Attributes:
      augment: the training augmentation (`AugmentConfig`), None for an eval loader; the device stage reads its
        jitter settings from here.
      preprocessing: the model's `Preprocessing` that images are decoded for.
    """

    def __init__(self, source: ImageSource, preprocessing: Preprocessing, *, batch_size: int, train: bool,
                 seed: int, num_epochs: int | None, shuffle: bool, drop_remainder: bool,
                 augment: AugmentConfig | None, workers: int, threads: int, shard_index: int, shard_count: int,
                 draft: bool, max_image_pixels: int, shuffle_buffer: int = 10_000):
        self.source = source
        self.preprocessing = preprocessing
        self.draft = draft
        self.max_image_pixels = max_image_pixels
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
        self.skipped = SkippedImages(source)
        n = len(source)
        # Every process runs the same number of (jitted, collective) steps: whole global batches of
        # batch_size x shard_count examples; the last one is dropped (training) or padded with masked rows (eval).
        self.global_batch_size = batch_size * shard_count
        self.shuffle_buffer = shuffle_buffer
        if getattr(source.images, "streaming", False):  # each process its own run of shards (data/shard_order.py)
            from flaxvision.data.shard_order import batches_per_epoch

            self._batches_per_epoch = batches_per_epoch(n, shard_count, batch_size, drop_remainder=drop_remainder)
        else:
            per_epoch = n / self.global_batch_size
            self._batches_per_epoch = math.floor(per_epoch) if drop_remainder else math.ceil(per_epoch)
        if self._batches_per_epoch == 0:
            raise FlaxvisionError(
                f"{source.name}: {n} examples make no full batch of {self.global_batch_size}"
                + (f" ({batch_size} per process x {shard_count} processes)" if shard_count > 1 else "")
                + "; lower the batch size or pass drop_remainder=False"
            )
        self._next_epoch = 0
        self._stream: Stream | None = None

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
        """Stop the worker processes and release their shared memory now; the next batch starts them again.

        It also happens when the loader is garbage-collected and at interpreter exit.
        """
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fingerprint(self) -> dict[str, Any]:
        """What a saved position depends on. Not the process count: (epoch, batch) count global batches, so a
        state saved by any number of processes resumes in any other with the same global batch size."""
        return {"num_examples": len(self.source), "global_batch_size": self.global_batch_size, "seed": self.seed,
                "train": self.train}

    def _stream_at(self, position: int) -> Stream:
        if self._stream is None:
            self._stream = Stream(self)
        self._stream.seek(position)
        return self._stream

    def batches(self) -> Any:
        """The endless stream of numpy batches as a grain MapDataset: epoch e, batch b is `batches()[e * len + b]`.

        Batch g is a pure function of (seed, g): that is what makes the order independent of the worker count and
        a resumed run identical to an uninterrupted one.
        """
        import grain

        maker = _BatchMaker(
            self.source, self.preprocessing, self.augment, batch_size=self.batch_size, batches_per_epoch=len(self),
            seed=self.seed, shuffle=self.shuffle, shard_index=self.shard_index, shard_count=self.shard_count,
            draft=self.draft, max_image_pixels=self.max_image_pixels, shuffle_buffer=self.shuffle_buffer,
        )
        return grain.MapDataset.range(0, sys.maxsize).map(maker)


class LoaderIterator:
    """Yields batch dicts {"image": uint8 (B, H, W, C), "label": int32 (B,), "mask": bool (B,), "id": int32 (B,)}.

    `mask` is False for padding rows (the last eval batch, or the last training batch with drop_remainder=False)
    and for eval images that could not be decoded. `id` is each example's row in its split (see
    `ImageSource.describe`), -1 on masked rows. All are numpy arrays of this process's rows, the caller's to keep.
    """

    def __init__(self, loader: Loader, start: int):
        self.loader = loader
        self._position = start  # global index of the next batch
        self._end = None if loader.num_epochs is None else start + len(loader) * loader.num_epochs
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
        check_fingerprint(state, self.loader._fingerprint())
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


def check_fingerprint(state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """A saved iterator state must come from a loader over the same data, global batch size and seed."""
    for key, value in fingerprint.items():
        saved = state.get(key)
        if (list(saved) if isinstance(saved, (list, tuple)) else saved) != value:
            raise FlaxvisionError(
                f"cannot resume the data iterator: the checkpoint was saved with {key}={saved!r}, this loader "
                f"has {key}={value!r}; use the same dataset, global batch size and seed"
            )


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
    shard_index: int = 0,
    shard_count: int = 1,
    shard_options: Any = None,
    draft: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    shuffle_buffer: int = 10_000,
) -> Loader:
    """A loader of uint8 numpy batches for a model with this `preprocessing`.

    Args:
      source: a split from `flaxvision.data.load`.
      preprocessing: the model's `Preprocessing` (size, channels, eval resize/crop, interpolation).
      batch_size: examples per batch (per process).
      train: training (shuffle, random augmentation, drop the last partial batch) or eval (in order, every
        example exactly once, the last batch padded with `mask` False rows).
      seed: seed of the shuffle and the augmentation: the same seed gives the same batches.
      num_epochs: epochs that one `for batch in loader` yields (1: one epoch per iteration, as a trainer's epoch
        loop wants; each new iteration continues with the next epoch); None: one endless iteration.
      workers: worker processes (0 decodes in this process, with `threads` threads).
      threads: decoding threads per process (default: the CPU count without workers, 1 with them).
      augment: training augmentation (default `AugmentConfig()`: RandomResizedCrop 0.7-1.0, flip, jitter 0.2);
        kept as `loader.augment` (None for eval) for the device stage's jitter.
      shuffle: default True for training, False for eval.
      drop_remainder: default True for training, False for eval (padded instead).
      shard_index, shard_count: this process's share of the data (pass jax.process_index() / process_count()
        for multi-process training); `shard_options` (a grain ShardOptions, e.g. ShardByJaxProcess()) also works.
      draft: decode JPEGs at a reduced size when the crop keeps enough pixels.
      max_image_pixels: images with more pixels (by their header) are skipped as decompression bombs.
      shuffle_buffer: a sharded source (tar, ArrayRecord, streamed parquet; data/shards.py): examples in the
        training shuffle buffer. Each process then reads only its own run of the epoch's shuffled shards
        (data/shard_order.py) instead of its rows of a global permutation.

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
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if threads is None:
        threads = 1 if workers else min(8, os.cpu_count() or 1)
    return Loader(
        source, preprocessing, batch_size=batch_size, train=train, seed=seed, num_epochs=num_epochs,
        shuffle=train if shuffle is None else shuffle,
        drop_remainder=train if drop_remainder is None else drop_remainder,
        augment=(augment or AugmentConfig()) if train else None, workers=workers, threads=max(0, threads),
        shard_index=shard_index, shard_count=shard_count, draft=draft, max_image_pixels=max_image_pixels,
        shuffle_buffer=shuffle_buffer,
    )
