"""The worker side of the pipeline: batch number -> decoded numpy batch. Pickled into every worker process.

Runs in grain's worker processes (or in the main process without workers): it uses numpy, PIL (through
`transforms`) and the source, never jax.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from flaxvision.data.image_source import ImageSource
from flaxvision.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, AugmentConfig, BadImage, decode_eval, decode_train
from flaxvision.preprocessing import Preprocessing

_REPLACEMENT_TRIES = 8  # a training image that cannot be decoded is replaced by one of up to 8 random others


def epoch_order(n: int, epoch: int, *, seed: int, shuffle: bool, global_batch_size: int, batches: int) -> np.ndarray:
    """Positions of an epoch's examples (a permutation seeded by (seed, epoch) when shuffling), cut to `batches`
    global batches: the remainder dropped, or padding with -1 up to whole batches. The streaming and the in-memory
    loaders share it, so both read the same examples in the same order."""
    positions = np.arange(n, dtype=np.int64)
    if shuffle:
        positions = np.random.default_rng([seed, epoch]).permutation(n)
    padded = np.full(batches * global_batch_size, -1, np.int64)
    kept = min(len(positions), len(padded))
    padded[:kept] = positions[:kept]
    return padded


class BatchMaker:
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

    def __init__(self, source: ImageSource, preprocessing: Preprocessing, augment: AugmentConfig | None, *,
                 batch_size: int, batches_per_epoch: int, seed: int, shuffle: bool, shard_index: int,
                 shard_count: int, draft: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 shuffle_buffer: int = 10_000):
        self.source = source
        self.preprocessing = preprocessing
        self.draft = draft
        self.max_image_pixels = max_image_pixels
        self.augment = augment
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle = shuffle
        self.shard = (shard_index, shard_count)
        # A sharded source (data/shards.py) is read process by process, each its own shards (data/shard_order.py).
        self.sharded = bool(getattr(source.images, "streaming", False))
        self.shuffle_buffer = shuffle_buffer
        self._order: tuple[int, np.ndarray] | None = None
        self._pool: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_order": None, "_pool": None}

    def order(self, epoch: int) -> np.ndarray:
        """Source positions of every process's examples in `epoch` (the global order), padded with -1 to whole
        global batches (eval: in order, every example once; training: a permutation, the remainder dropped)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        if self.sharded:
            return self._process_order(epoch)
        padded = epoch_order(len(self.source), epoch, seed=self.seed, shuffle=self.shuffle and self.augment is not None,
                             global_batch_size=self.batch_size * self.shard[1], batches=self.batches_per_epoch)  # fmt: skip
        self._order = (epoch, padded)
        return padded

    def _process_order(self, epoch: int) -> np.ndarray:
        """A sharded source: this process's own positions of `epoch` in reading order, cut or padded (-1) to
        `batches_per_epoch` batches."""
        from flaxvision.data.shard_order import process_order

        index, count = self.shard
        mine = process_order(self.source.images.shard_of(self.source.ids), epoch, seed=self.seed, process=index,
                             processes=count, shuffle=self.shuffle and self.augment is not None,
                             buffer=self.shuffle_buffer)  # fmt: skip
        padded = np.full(self.batches_per_epoch * self.batch_size, -1, np.int64)
        kept = min(len(mine), len(padded))
        padded[:kept] = mine[:kept]
        self._order = (epoch, padded)
        self._pool = (epoch, padded[padded >= 0])
        return padded

    def _replacement_pool(self, epoch: int) -> np.ndarray:
        """This process's positions of `epoch` (a sharded source's replacements for unusable training images),
        computed once per epoch: a batch draws from it for every row."""
        if self._pool is None or self._pool[0] != epoch:
            self._process_order(epoch)
        assert self._pool is not None
        return self._pool[1]

    def rows(self, g: int) -> tuple[np.ndarray, int]:
        """(source positions of this process's rows of batch g, row of the first one in the global batch)."""
        epoch, b = divmod(int(g), self.batches_per_epoch)
        (index, count), size = self.shard, self.batch_size
        first = index * size
        if self.sharded:
            return self.order(epoch)[b * size:(b + 1) * size], first
        start = b * size * count + first
        return self.order(epoch)[start:start + size], first

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        g = int(g)
        positions, first_row = self.rows(g)
        size, channels, batch = self.preprocessing.img_size, self.preprocessing.channels, self.batch_size
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
            if rng is not None:  # (a sharded source: replacements from this process's own examples of the epoch)
                pool = self._replacement_pool(g // self.batches_per_epoch) if self.sharded else None
                candidates += (pool[rng.integers(len(pool), size=_REPLACEMENT_TRIES)].tolist() if pool is not None
                               else rng.integers(len(self.source), size=_REPLACEMENT_TRIES).tolist())  # fmt: skip
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
        if self.augment is None or rng is None:
            return decode_eval(data, self.preprocessing, draft=self.draft, max_image_pixels=self.max_image_pixels)
        return decode_train(data, self.preprocessing, self.augment, rng, draft=self.draft,
                            max_image_pixels=self.max_image_pixels)


def worker_init(worker_index: int, worker_count: int) -> None:
    """Runs first in every grain worker process: JAX there may only ever see the CPU."""
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None:  # imported by the spawn bootstrap (the parent's __main__); backends are not up yet
        jax.config.update("jax_platforms", "cpu")


def mark_absl_flags_parsed() -> None:
    """grain reads absl flags in its workers; a script or CLI that does not use absl.app never parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

