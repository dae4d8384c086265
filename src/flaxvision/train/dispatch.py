"""Several training steps per device call: batches grouped for `Trainer.train_steps` (train.step.make_multi_step).

For a small model one step takes about as long as launching it and doing the loop's bookkeeping, so the loop hands
the device K stacked batches at a time and a `lax.scan` runs the K steps. A group never crosses a step at which the
loop must look at the state (a metrics read, an evaluation, a checkpoint, the edge of a profile window) nor the end
of the epoch: a group cut short there runs as single steps (two compiled programs in all: K steps, and one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


class StepGroups:
    """Yield ((batch, stacked), tags) from (batch, tag) items: K stacked batches (K, B, ...) with stacked True and
    their K tags, or one batch alone (stacked False) with its tag.

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

    def __iter__(self) -> Iterator[tuple[tuple[dict[str, np.ndarray], bool], list[Any]]]:
        pending: list[tuple[dict[str, np.ndarray], Any]] = []
        for item in self.items:
            if self.k == 1:
                self.step += 1
                yield (item[0], False), [item[1]]
                continue
            pending.append(item)
            size = self.size_at(self.step)
            if size < self.k:  # a boundary is near: single steps up to it
                yield from self._singles(pending)
                pending = []
            elif len(pending) == self.k:
                self.step += self.k
                stacked = {key: np.stack([b[key] for b, _ in pending]) for key in pending[0][0]}
                yield (stacked, True), [tag for _, tag in pending]
                pending = []
        yield from self._singles(pending)  # the epoch ended inside a group

    def _singles(self, pending: list[tuple[dict[str, np.ndarray], Any]]) -> Iterator[tuple[tuple[dict[str, np.ndarray], bool], list[Any]]]:
        for batch, tag in pending:
            self.step += 1
            yield (batch, False), [tag]
