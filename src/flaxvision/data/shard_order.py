"""Which examples each process reads, in which order, from a sharded dataset: disjoint, balanced, resumable.

    seq = process_order(shard_of, epoch, seed=0, shuffle=True, process=1, processes=4, buffer=10_000)

Epoch e of a source of N examples in S shards:
  1. the shards are put in an order: a permutation seeded by (seed, e) when training, the file order otherwise;
  2. the examples, shard after shard in that order, form one sequence of N; process p takes its contiguous run
     [p N / P, (p + 1) N / P): the runs are disjoint, differ in length by at most one, and each covers whole shards
     except at its two ends (with fewer shards than processes, processes share a shard by rows);
  3. a training run goes through a shuffle buffer of `buffer` examples seeded by (seed, e, p): fill it, then each
     next example swaps into the slot of a uniformly drawn one, which is emitted; the rest leaves in random order.

So a process reads its own shards near-sequentially (an example leaves the buffer at most a few buffer lengths
after it was read), and the order is a pure function of (seed, epoch, process, process count): a resumed run gets
the same batches without saving the buffer, and any worker count reads the same. The buffer is simulated on
example numbers, so a worker only decodes the examples of its own batches.

Written by hand: grain's shuffling is a global permutation (every process would read every shard), and
WebDataset's shard splitting and buffers are not reproducible across restarts.
"""

from __future__ import annotations

import numpy as np


def process_range(n: int, process: int, processes: int) -> tuple[int, int]:
    return process * n // processes, (process + 1) * n // processes


def shard_sequence(shard_of: np.ndarray, epoch: int, *, seed: int, shuffle: bool) -> np.ndarray:
    """Positions 0..N-1 ordered shard by shard (shards in a (seed, epoch) permutation when shuffling), keeping the
    positions' order within a shard."""
    shard_of = np.asarray(shard_of, np.int64)
    shards = np.unique(shard_of)
    rank = np.empty(int(shards.max()) + 1 if len(shards) else 0, np.int64)
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(shards)) if shuffle else np.arange(len(shards))
    rank[shards[order]] = np.arange(len(shards))
    return np.lexsort((np.arange(len(shard_of)), rank[shard_of]))


def buffer_shuffle(items: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """`items` through a shuffle buffer of `buffer` slots (each output drawn uniformly from what the buffer holds)."""
    items = np.asarray(items)
    n = len(items)
    if buffer <= 1 or n <= 1:
        return items.copy()
    size = min(buffer, n)
    slots = items[:size].copy()
    out = np.empty_like(items)
    draws = rng.integers(0, size, n)  # one draw per emitted example while the buffer is refilled
    k = 0
    for nxt in range(size, n):
        j = draws[k]
        out[k] = slots[j]
        slots[j] = items[nxt]
        k += 1
    out[k:] = slots[rng.permutation(size)]
    return out


def process_order(shard_of: np.ndarray, epoch: int, *, seed: int, shuffle: bool, process: int, processes: int,
                  buffer: int) -> np.ndarray:  # fmt: skip
    """This process's positions for `epoch`, in reading order (see the module docstring)."""
    sequence = shard_sequence(shard_of, epoch, seed=seed, shuffle=shuffle)
    lo, hi = process_range(len(sequence), process, processes)
    mine = sequence[lo:hi]
    if shuffle:
        mine = buffer_shuffle(mine, buffer, np.random.default_rng([seed, epoch, process, 0xB0F]))
    return mine


def batches_per_epoch(n: int, processes: int, batch_size: int, *, drop_remainder: bool) -> int:
    """Batches each process yields per epoch: the same for all (their steps are collective). Training drops what
    does not fill a batch in the shortest run (under one batch per process); evaluation pads the longest."""
    shortest, longest = n // processes, -(-n // processes)
    return shortest // batch_size if drop_remainder else -(-longest // batch_size)
