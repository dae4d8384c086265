"""One training session: the epochs of steps, with logging, evaluation, checkpoints and safe stops.

`fit` (train.loop) prepares a `Session` and calls `run()`; everything that changes while steps run lives here:
the step counter, the `Progress` that checkpoints carry, the clocks, the last evaluation.
"""

from __future__ import annotations

import contextvars
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from flaxvision import distributed, files
from flaxvision.data.device import as_batch
from flaxvision.errors import FlaxvisionError, TrainingDiverged, TrainingInterrupted
from flaxvision.train.checkpoint import Checkpointer, Progress
from flaxvision.train.dispatch import StepGroups
from flaxvision.train.instrument import StepProfiler, hardware, peak_memory
from flaxvision.train.rundir import MetricsLog, RunDirectory
from flaxvision.train.trainer import Trainer, out_of_memory_error

# The `flaxvision train ...` command line of this run (shlex-joined), set by commands/train.py around `fit` and
# recorded in summary.json; None when training was started from Python.
COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("flaxvision_train_command", default=None)


class Session:
    def __init__(self, run: RunDirectory, trainer: Trainer, checkpointer: Checkpointer, log: MetricsLog,
                 progress: Progress, *, train_data: Iterable, val_data: Iterable | None,
                 on_epoch_end: Callable[[Trainer, dict[str, Any]], None] | None = None,
                 fit_started: float | None = None):  # fmt: skip
        self.run_dir, self.trainer, self.checkpointer, self.log = run, trainer, checkpointer, log
        self.progress = progress
        self.train_data, self.val_data, self.on_epoch_end = train_data, val_data, on_epoch_end
        self.config = trainer.config
        self.processes = jax.process_count()
        self.is_main = jax.process_index() == 0
        self.step = int(jax.device_get(trainer.state.step))
        self.started = time.perf_counter() - progress.wall_seconds
        self.last_eval: dict[str, Any] | None = None
        self.compile_seconds: float | None = None
        self.first_step_seconds: float | None = None
        self.fit_started = fit_started if fit_started is not None else time.perf_counter()
        self.input_wait = 0.0  # seconds this epoch waited for the next batch
        self.profiler = StepProfiler(self.config.profile, run.file("profile"), is_main=self.is_main,
                                     processes=self.processes)  # fmt: skip
        self._images_since_log, self._log_clock = 0, time.perf_counter()

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Train to the end of the last epoch; a stop (Ctrl-C, NaN, full disk, lost peer) raises one clear error."""
        ctrl_c = DeferredInterrupt(defer=self.processes == 1)
        try:
            while self.progress.epoch < self.config.epochs:
                self._epoch(ctrl_c)
                ctrl_c.stop_here()
        except KeyboardInterrupt:
            ctrl_c.restore()
            saved = False
            if not ctrl_c.forced:  # progress holds the data position of the last step that ran
                try:
                    self.checkpointer.wait()
                    if self.checkpointer.latest_step() != self.step:  # (an epoch end has just saved this step)
                        self.save()
                    saved = True
                except RuntimeError:  # the step still owned (donated) the state
                    pass
            self.checkpointer.close()
            raise interrupted_error(self.run_dir, self.checkpointer, self.step, saved) from None
        except BaseException as err:
            self._close_after(err)
            clear = self._as_clear_error(err)
            if clear is err:
                raise
            raise clear from err
        finally:
            ctrl_c.restore()
            self.profiler.stop(self.trainer.state)
        self._close_after(None)

    def _epoch(self, ctrl_c: DeferredInterrupt) -> None:
        config, trainer, p = self.config, self.trainer, self.progress
        epoch = p.epoch
        cursor = EpochCursor(self.train_data, epoch, p.data_state, p.batch_in_epoch)
        bar = tqdm(total=trainer.steps_per_epoch, initial=cursor.consumed, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and self.is_main), unit="step", dynamic_ncols=True)  # fmt: skip
        clock = time.perf_counter()
        timed_images, timed_seconds, self.input_wait = 0, 0.0, 0.0  # this epoch's, after compilation, no evaluations
        local_batch = config.batch_size // self.processes
        full_batches = ((b, pos) for b, pos in cursor if len(b["label"]) == local_batch)
        groups = StepGroups(self._timed(full_batches), trainer.steps_per_dispatch, self.step, self._boundaries(),
                            self.profiler.marks)  # fmt: skip
        for (batch, stacked), tags in trainer.stage.prefetch(groups, put=self._put):
            self.profiler.before(self.step, trainer.state)
            dispatched = time.perf_counter()
            if stacked:
                trainer.state = trainer.train_steps(trainer.state, batch)  # pyright: ignore[reportOptionalCall]
            else:
                trainer.state = trainer.train_step(trainer.state, batch)
            k = len(tags)
            self.step += k
            if self.compile_seconds is None:  # one sync, once: keep compilation out of the throughput
                jax.block_until_ready(trainer.state.step)
                clock = self._log_clock = time.perf_counter()
                self.compile_seconds = clock - dispatched  # compilation (or a cache load) and the first call
                self.first_step_seconds = clock - self.fit_started
            else:
                self._images_since_log += k * config.batch_size
                p.train_images += k * config.batch_size
                timed_images += k * config.batch_size
            bar.update(k)
            self.profiler.after(self.step, trainer.state)
            if self.step % config.log_every == 0:
                r = self.log_train()
                bar.set_postfix(loss=f"{r['loss']:.4f}", acc=f"{r['accuracy']:.3f}", img_s=f"{r['images_per_second']:.0f}")
            position, data_state = tags[-1]
            p.batch_in_epoch, p.data_state = position, data_state
            ctrl_c.stop_here()  # state, step and data position agree: a safe point to stop
            mid_epoch = position < trainer.steps_per_epoch
            if mid_epoch and config.eval_every and self.step % config.eval_every == 0 and self.val_data is not None:
                jax.block_until_ready(trainer.state.step)  # the clock stops when the steps have run, not when queued
                timed_seconds += time.perf_counter() - clock
                p.train_seconds += time.perf_counter() - clock
                self.save(self._score(self.evaluate(epoch)))
                clock = self._log_clock = time.perf_counter()
            elif mid_epoch and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save()
            if not mid_epoch:
                break
        jax.block_until_ready(trainer.state.step)
        timed_seconds += time.perf_counter() - clock
        p.train_seconds += time.perf_counter() - clock
        self._epoch_record(epoch, timed_images, timed_seconds)
        bar.close()
        if self.step % config.log_every:
            self.log_train()
        p.epoch, p.batch_in_epoch, p.data_state = epoch + 1, 0, None
        result = self.evaluate(epoch) if self.val_data is not None else None
        if result is not None and self.is_main:
            ema = f"; EMA: val loss {result['ema']['val_loss']:.4f}, top-1 {result['ema']['val_accuracy']:.4f}" if "ema" in result else ""
            print(f"epoch {epoch + 1}/{config.epochs}: val loss {result['val_loss']:.4f}, "
                  f"top-1 {result['val_accuracy']:.4f}, top-5 {result['val_top5_accuracy']:.4f}{ema}")  # fmt: skip
        self.save(self._score(result) if result else None)
        self._report_skipped(epoch)
        self._images_since_log, self._log_clock = 0, time.perf_counter()
        if self.on_epoch_end is not None:
            self.on_epoch_end(trainer, result or {})

    def _timed(self, items: Iterable[Any]) -> Iterator[Any]:
        """`items`, adding the time spent waiting for each to self.input_wait."""
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.input_wait += time.perf_counter() - start
            yield item

    def _put(self, item: tuple[dict[str, np.ndarray], bool], tags: Any) -> tuple[Any, bool]:
        batch, stacked = item
        return (self.trainer.stage.put_group(batch) if stacked else self.trainer.stage.put(batch)), stacked

    def _boundaries(self) -> list[int]:
        """Step periods a group of steps must not cross: metric reads, evaluations, checkpoints."""
        config = self.config
        return [n for n in (config.log_every, config.eval_every, config.checkpoint_every) if n]

    def _epoch_record(self, epoch: int, images: int, seconds: float) -> None:
        """The epoch's synchronized training time and throughput (after compilation, without evaluations), its share
        of that time waiting for input, and the peak memory."""
        peak, where = peak_memory(self.trainer.mesh.devices.flat[0])
        record = {"type": "epoch", "step": self.step, "epoch": epoch + 1, "train_seconds": seconds,
                  "images_per_second": images / seconds if images and seconds > 0 else None,
                  "input_wait_share": min(1.0, self.input_wait / seconds) if seconds > 0 else None,
                  "peak_memory_bytes": peak, "peak_memory_of": where}  # fmt: skip
        self.log.write(record)

    # ---- bookkeeping -----------------------------------------------------------------------------------------------
    def save(self, val_accuracy: float | None = None) -> None:
        """Every process calls this (Orbax writes the arrays cooperatively); the data-iterator state of every
        process goes into the progress record, which process 0 writes."""
        p = self.progress
        p.wall_seconds, p.processes = time.perf_counter() - self.started, self.processes
        p.data_states = distributed.allgather_json(p.data_state)
        self.checkpointer.save(self.step, self.trainer.state, p, val_accuracy=val_accuracy)

    def log_train(self) -> dict[str, float]:
        m = self.trainer.read_train_metrics()
        if m["first_bad_step"] >= 0:
            raise diverged_error(self.run_dir, self.checkpointer, int(m["first_bad_step"]))
        now = time.perf_counter()
        rate = self._images_since_log / max(now - self._log_clock, 1e-9)
        self._images_since_log, self._log_clock = 0, now
        record = {"type": "train", "step": self.step, "epoch": self.progress.epoch + 1, "loss": m["loss"],
                  "accuracy": m["accuracy"], "lr": float(np.asarray(self.trainer.schedule(self.step - 1))), "images_per_second": rate}  # fmt: skip
        self.log.write(record)
        return record

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Evaluate the raw weights (and their EMA, as result["ema"], when the run keeps one); log both."""
        result = self.trainer.evaluate(self.val_data)  # type: ignore[arg-type]
        keys = ("val_loss", "val_accuracy", "val_top5_accuracy", "val_count")
        record = {"type": "eval", "step": self.step, "epoch": epoch + 1, **{k: result[k] for k in keys}}
        if self.trainer.has_ema:
            result["ema"] = self.trainer.evaluate(self.val_data, weights="ema")  # type: ignore[arg-type]
            record.update({f"ema_{k}": result["ema"][k] for k in keys[:3]})
        self.last_eval = result
        if self.progress.improves(self._score(result)):
            self.progress.best_val_accuracy, self.progress.best_step = self._score(result), self.step
        self.log.write(record)
        return result

    def _score(self, result: dict[str, Any]) -> float:
        """The top-1 that chooses the best checkpoint: of the raw weights or of their EMA (--best-by)."""
        return result["ema"]["val_accuracy"] if self.config.best_by == "ema" else result["val_accuracy"]

    def summary(self) -> dict[str, Any]:
        p, last = self.progress, self.last_eval
        return {
            "best_val_accuracy": p.best_val_accuracy,
            "final_val_accuracy": last["val_accuracy"] if last else None,
            "final_val_loss": last["val_loss"] if last else None,
            "final_val_top5_accuracy": last["val_top5_accuracy"] if last else None,
            **({"final_ema_val_accuracy": last["ema"]["val_accuracy"], "final_ema_val_loss": last["ema"]["val_loss"]}
               if last and "ema" in last else {}),
            "best_by": self.config.best_by,
            "best_step": p.best_step,
            "epochs": self.config.epochs,
            "steps": self.step,
            "wall_seconds": time.perf_counter() - self.started,
            "train_images_per_second": p.train_images / max(p.train_seconds, 1e-9),
            "compile_seconds": self.compile_seconds,
            "first_step_seconds": self.first_step_seconds,
            "steps_per_dispatch": self.trainer.steps_per_dispatch,
            "devices": len(self.trainer.mesh.devices.flat),
            "command": COMMAND.get(),
            "hardware": hardware(),
        }

    def _report_skipped(self, epoch: int) -> None:
        skipped = getattr(self.train_data, "skipped", None)
        ids = skipped.epochs.get(epoch) if skipped is not None else None
        if ids and self.is_main:
            print(f"epoch {epoch + 1}: skipped {len(ids)} unusable images (ids {ids[:10]}{' ...' if len(ids) > 10 else ''})")

    def _close_after(self, err: BaseException | None) -> None:
        """Close the checkpointer (waiting for the last save); a failure there is reported unless one is already."""
        try:
            self.checkpointer.close()
        except Exception as close_err:
            if err is None:
                clear = self._as_clear_error(close_err)
                if clear is close_err:
                    raise
                raise clear from close_err

    def _as_clear_error(self, err: BaseException) -> BaseException:
        storage = storage_failure(err, self.run_dir)
        if storage is not None:
            return storage
        if isinstance(err, jax.errors.JaxRuntimeError):
            oom = out_of_memory_error(err, self.config)  # pyright: ignore[reportArgumentType]  (an Exception)
            if oom is None and self.processes > 1:  # a collective that failed: a peer is gone (or going)
                who = f"process {jax.process_index()} of {self.processes}"
                message = distributed.peer_lost_message(who, distributed.resume_hint(self.run_dir.path))
                return distributed.PeerProcessLost(f"{message} ({str(err).splitlines()[0]})")
            return oom or err
        return err

# ---- the pieces ----------------------------------------------------------------------------------------------------


class EpochCursor:
    """One epoch of a re-iterable data source, with a position that can be saved and restored."""

    def __init__(self, data: Iterable, epoch: int, state: Any = None, skip: int = 0):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)  # pyright: ignore[reportAttributeAccessIssue]  (checked just above)
        self.iterator: Any = iter(data)
        self.consumed = 0
        if state is not None and hasattr(self.iterator, "set_state"):
            self.iterator.set_state(_from_json_safe(state))
            self.consumed = skip
        else:
            for _ in range(skip):
                next(self.iterator)
                self.consumed += 1

    def __iter__(self) -> Iterator[tuple[dict[str, Any], tuple[int, Any]]]:
        """Yield (batch, position after it); the position is taken before anything reads ahead (prefetch)."""
        stateful = hasattr(self.iterator, "get_state")
        for batch in self.iterator:
            self.consumed += 1
            yield as_batch(batch), (self.consumed, _json_safe(self.iterator.get_state()) if stateful else None)  # type: ignore[attr-defined]


def _json_safe(state: Any) -> Any:
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("latin-1")}
    return state


def _from_json_safe(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode("latin-1")
    return state


class DeferredInterrupt:
    """Ctrl-C while training stops at the next safe point (after a step's bookkeeping), so the checkpoint written
    then matches the data position exactly; a second Ctrl-C stops at once (the last checkpoint stands)."""

    def __init__(self, defer: bool = True):
        # Several processes: a Ctrl-C reaches them at different steps (or only one of them), and a checkpoint is
        # a collective, so the interrupted process stops at once and the last checkpoint stands.
        self.requested, self.forced = False, not defer
        self.previous = None
        if defer and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True

    def stop_here(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def diverged_error(run: RunDirectory, checkpointer: Checkpointer, bad_step: int) -> TrainingDiverged:
    """The NaN/Inf stop: name the newest checkpoint saved before the bad step and record it for --resume."""
    checkpointer.wait()
    good = max((s for s in checkpointer.all_steps() if s <= bad_step), default=None)
    if run.is_main:
        run.write_json("diverged.json", {"bad_step": bad_step + 1, "last_good_step": good})
    where = f"{checkpointer.directory / str(good)} (intact)" if good is not None else "none was written yet"
    resume = (f"; to continue from it with a lower learning rate: --run-dir {run.path} --resume --lr LR --allow-changes"
              if good is not None else "")  # fmt: skip
    return TrainingDiverged(
        f"the loss became NaN or Inf at step {bad_step + 1}; the run stopped. Last good checkpoint: {where}. "
        f"Lower --lr, add --clip-grad-norm 1.0, or check the data{resume}"
    )


def interrupted_error(run: RunDirectory, checkpointer: Checkpointer, step: int, saved: bool) -> TrainingInterrupted:
    where = (f"checkpoint saved in {checkpointer.directory / str(step)}" if saved
             else f"latest checkpoint: {checkpointer.latest_step()} in {checkpointer.directory}")  # fmt: skip
    return TrainingInterrupted(
        f"interrupted at step {step}; {where}; to continue, run the same command with --run-dir {run.path} --resume"
    )


def storage_failure(err: BaseException, run: RunDirectory) -> FlaxvisionError | None:
    """An error from a full, read-only or vanished run directory (also as Orbax/tensorstore wrap it), else None."""
    text = f"{type(err).__name__}: {err}"
    markers = {"No space left": 28, "Read-only file system": 30, "Disk quota": 122, "errno 28": 28}
    code = getattr(err, "errno", None) if isinstance(err, OSError) else next((c for m, c in markers.items() if m in text), None)
    if code is None:
        return None
    path = getattr(err, "filename", None) or run.checkpoints
    return files.storage_error(OSError(code, os.strerror(code)), path)

