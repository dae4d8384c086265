"""The loader's running grain pipeline: worker processes, their shared-memory batches, and closing it all.

A `Stream` belongs to one `Loader` (see `pipeline`). With workers, grain sends each batch through shared-memory
segments; this module makes sure every one of them is unlinked: batches are copied out as they arrive, `close()`
stops the workers and drops what they had buffered, and streams nobody closed are closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxvision.data.batches import mark_absl_flags_parsed, worker_init

if TYPE_CHECKING:
    from flaxvision.data.pipeline import Loader


class Stream:
    """The loader's running pipeline: the grain iterator, its worker processes and the batches they buffer.

    It keeps running across epochs; `seek` restarts it only when asked for a batch other than the next one.
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        self.position = 0  # global index of the batch `take` returns next
        self._host: Any = None

    def seek(self, position: int) -> None:
        if position != self.position or self._host is None:
            self.close()
            self.position = position

    def take(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the next batch, ids of the unusable images it met)."""
        if self._host is None:
            self._host = self._start()
        batch = next(self._host)
        if self.loader.workers:
            # Copy out of grain's shared-memory segments into ordinary arrays the caller may keep as long as it
            # likes: grain unlinks a segment when its array goes, which is now rather than when the batch goes.
            batch = {k: np.array(v) for k, v in batch.items()}
        skipped = batch.pop("skipped")
        self.position += 1
        return batch, skipped[skipped >= 0]

    def _start(self) -> Any:
        import grain

        ds = self.loader.batches()[self.position:]
        threads = self.loader.threads
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads)))
        if self.loader.workers > 0:
            mark_absl_flags_parsed()
            options = grain.MultiprocessingOptions(num_workers=self.loader.workers, per_worker_buffer_size=2)
            ds = ds.mp_prefetch(options, worker_init_fn=worker_init)
            _close_at_exit(self)
        return iter(ds)

    def close(self) -> None:
        host, self._host = self._host, None
        _RUNNING.discard(self)
        if host is None:
            return
        if hasattr(host, "close"):
            host.close()  # grain stops the workers and unlinks the batches still queued in them
        del host  # and the batches its threads had already taken in here go with their arrays
        if self.loader.workers:
            _wait_for_unlinks()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# Streams with worker processes that are running; closed at interpreter exit.
_RUNNING: weakref.WeakSet[Stream] = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []


def _close_at_exit(stream: Stream) -> None:
    """Make sure this stream is closed before the interpreter exits, even when nobody calls `close()`.

    Without it, the batches in flight at exit (the workers' output queues and grain's read-ahead buffers in this
    process) were never unlinked: multiprocessing's exit handler terminates the workers, grain's arrays here are
    not garbage-collected at shutdown, and Python's resource_tracker warned of "leaked shared_memory objects".
    The hook is registered after multiprocessing's own exit handler (grain imports multiprocessing first), so it
    runs before it, while the workers, their queues and grain's unlink thread are still alive.
    """
    _RUNNING.add(stream)
    if not _EXIT_HOOK:
        atexit.register(_close_running_streams)
        _EXIT_HOOK.append(True)


def _close_running_streams() -> None:
    for stream in list(_RUNNING):
        try:
            stream.close()
        except Exception:  # exiting anyway: one stream that fails to stop must not keep the others running
            pass


def _wait_for_unlinks(timeout: float = 10.0) -> None:
    """Wait until grain has unlinked the shared memory of every batch array already dropped.

    grain unlinks a segment when its array is garbage-collected, as a task on a one-thread ThreadPool
    (`enable_async_del`). At exit, multiprocessing's exit handler terminates that pool and drops the tasks it has
    not run yet, so those segments would stay linked. A no-op task through the same single thread completes after
    every unlink queued before it. (Not observed to matter in the tests on an idle machine; it closes the race.)
    """
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another grain layout: nothing we know of to wait for
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        try:
            pool.apply_async(int).wait(timeout)
        except Exception:  # a pool already shut down has nothing left to do
            pass
