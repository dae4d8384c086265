"""Dynamic batching for `flaxvision serve`: one device worker, a few compiled batch sizes ("buckets").

Requests put their decoded images (uint8 HWC at the model's size) into one queue. ONE worker thread takes the
first image, then waits at most `max_wait_s` for more, up to `max_batch`, and only while `more_coming()` says that
some request in flight has not queued its images yet (so a lone request is not delayed); it pads the batch with zeros to the
smallest bucket that holds it, runs the jitted program (softmax of `program.inference_function(model, "uint8")`:
normalisation inside, float32) and hands each image's probabilities back to the asyncio future of its request.
The buckets are the powers of two below `max_batch` and `max_batch` itself, each compiled by `warm_up()`, so no
request ever waits on a compilation and the number of compiled shapes stays the number of buckets
(`Batcher.traces` counts the traces of the program: it is how the tests check that).

Written by hand (a queue and a thread) because the batching policy is a dozen lines and the libraries that offer
it either pull a framework of their own or batch per-coroutine without a device worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("flaxvision.serve")
WAIT_SLICE_S = 0.001


class BatchFailed(RuntimeError):
    """The device batch holding an image failed; the batcher has logged why (with the traceback) once."""


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """The compiled batch sizes: 1, 2, 4, ... below `max_batch`, and `max_batch` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


class Batcher:
    """The device worker: `submit(image)` -> a future of that image's class probabilities (float32 numpy).

    Counters (read by GET /health): `batches` run, `images` predicted, `max_batch_seen` (the most real images in
    one batch), `traces` (compilations of the program: one per bucket once warmed up).
    """

    def __init__(self, model: Any, max_batch: int, max_wait_s: float):
        import jax

        from flaxvision.ship.program import inference_function

        fn, self.spec = inference_function(model, "uint8")
        self.buckets = buckets_for(max_batch)
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.batches = self.images = self.max_batch_seen = self.traces = 0

        def probabilities(images: jax.Array) -> jax.Array:
            self.traces += 1  # Python runs only while jax traces: once per new input shape
            return jax.nn.softmax(fn(images), axis=-1)

        self._program = jax.jit(probabilities)
        self._queue: queue.Queue[tuple[np.ndarray, asyncio.Future, asyncio.AbstractEventLoop] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="flaxvision-device", daemon=True)
        # Whether more images may come soon (the server: a request in flight has not queued its images yet). A
        # batch waits for more only while this is true: a lone request does not pay max_wait_s.
        self.more_coming: Callable[[], bool] = lambda: True

    def warm_up(self) -> None:
        """Compile (and run once) every bucket, before the server says it is ready."""
        for size in self.buckets:
            np.asarray(self._program(np.zeros(self.spec.shape(size), np.uint8)))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the worker."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def submit(self, image: np.ndarray) -> asyncio.Future:
        """Queue one image; the returned future (of the running loop) gets its probabilities."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((image, future, loop))
        return future

    def bucket(self, n: int) -> int:
        return next(size for size in self.buckets if size >= n)

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.more_coming():
                        break
                    try:  # in slices, to stop waiting as soon as nothing more is coming
                        item = self._queue.get(timeout=min(left, WAIT_SLICE_S))
                    except queue.Empty:
                        continue
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[tuple[np.ndarray, asyncio.Future, asyncio.AbstractEventLoop]]) -> None:
        n = len(batch)
        try:
            padded = np.zeros(self.spec.shape(self.bucket(n)), np.uint8)  # zero rows: their outputs are dropped
            for row, (image, _, _) in enumerate(batch):
                padded[row] = image
            probs = np.asarray(self._program(padded))[:n]
        except Exception as err:  # reported to each waiting request as a 500; the worker keeps serving
            log.exception("flaxvision serve: the device batch of %d image(s) failed", n)
            failed = BatchFailed(f"the device batch failed: {type(err).__name__}")
            for _, future, loop in batch:
                loop.call_soon_threadsafe(_resolve, future, None, failed)
            return
        self.batches += 1
        self.images += n
        self.max_batch_seen = max(self.max_batch_seen, n)
        for (_, future, loop), row in zip(batch, probs):
            loop.call_soon_threadsafe(_resolve, future, row, None)


def _resolve(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the request went away (client disconnected, cancelled)
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
