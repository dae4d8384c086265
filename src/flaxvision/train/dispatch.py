"""Several training steps per device call: batches grouped for `Trainer.train_steps` (train.step.make_multi_step).

For a small model one step takes about as long as launching it and doing the loop's bookkeeping, so the loop hands
the device K stacked batches at a time and a `lax.scan` runs the K steps. A group never crosses a step at which the
loop must look at the state (a metrics read, an evaluation, a checkpoint, the edge of a profile window) nor the end
of the epoch: there it is cut short and the rest of its K slots is filled with a copy of its last batch, marked
inactive, so one compiled program serves every group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


class StepGroups:
    """Yield ((batch, active), tags) from (batch, tag) items: with K == 1 each batch alone (active None); else K
    stacked batches (K, B, ...) with `active` (K,) bool, and the tags of the batches that run, in order.

    Args:
      items: (numpy batch dict, tag) pairs, one per step.
      k: steps per call.
      step: the global step count before the first item.
      periods: steps whose multiples a group must end at (log_every, eval_every, checkpoint_every).
      marks: absolute step counts a group must end at (a profile window's start and end).
    """

    def __init__(self, items: Iterable[tuple[dict[str, np.ndarray], Any]], k: int, step: int,
                 periods: Sequence[int] = (), marks: Sequence[int] = ()):  # fmt: skip
        self.items, self.k, self.step = items, k, step
        self.periods, self.marks = [p for p in periods if p], list(marks)

    def size_at(self, step: int) -> int:
        """Steps in the group that starts after `step` steps: K, or fewer to stop at the next boundary."""
        size = self.k
        for period in self.periods:
            size = min(size, period - step % period)
        for mark in self.marks:
            if mark > step:
                size = min(size, mark - step)
        return size

    def __iter__(self) -> Iterator[tuple[tuple[dict[str, np.ndarray], np.ndarray | None], list[Any]]]:
        if self.k == 1:
            for batch, tag in self.items:
                self.step += 1
                yield (batch, None), [tag]
            return
        pending: list[tuple[dict[str, np.ndarray], Any]] = []
        for item in self.items:
            pending.append(item)
            if len(pending) == self.size_at(self.step):
                yield self._stack(pending)
                pending = []
        if pending:  # the epoch ended inside a group
            yield self._stack(pending)

    def _stack(self, pending: list[tuple[dict[str, np.ndarray], Any]]) -> tuple[tuple[dict[str, np.ndarray], np.ndarray], list[Any]]:
        self.step += len(pending)
        batches = [b for b, _ in pending]
        batches += [batches[-1]] * (self.k - len(batches))
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        active = np.arange(self.k) < len(pending)
        return (stacked, active), [tag for _, tag in pending]
