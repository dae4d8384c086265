"""What a run records about itself beyond its metrics: a jax.profiler trace of chosen steps, peak memory, and the
hardware it ran on."""

from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Any

import jax

from flaxvision.train.config import profile_window


class StepProfiler:
    """`--profile START:COUNT`: a jax.profiler trace of the COUNT steps after the first START, into `directory`
    (TensorBoard's profile plugin reads it; perfetto_trace.json.gz opens in ui.perfetto.dev).

    The loop calls `before(step, state)` ahead of each call and `after(step, state)` once it is dispatched; step
    groups (train.dispatch) end at the window's edges. The state is waited for at both edges, so the trace holds
    exactly those steps. Several processes each write their own subdirectory.
    """

    def __init__(self, spec: str | None, directory: Path, *, is_main: bool, processes: int):
        self.window = profile_window(spec) if spec else None
        self.directory = directory / f"process-{jax.process_index()}" if processes > 1 else directory
        self.is_main = is_main
        self.active = False

    @property
    def marks(self) -> list[int]:
        return [] if self.window is None else [self.window[0], self.window[0] + self.window[1]]

    def before(self, step: int, state: Any) -> None:
        if self.window is not None and not self.active and step == self.window[0]:
            jax.block_until_ready(state)
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            except Exception as err:  # a profile is never worth a run: say so and train on
                self.window = None
                print(f"flaxvision: warning: no profile: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                return
            self.active = True

    def after(self, step: int, state: Any) -> None:
        if self.active and self.window is not None and step >= sum(self.window):
            self.stop(state, step)

    def stop(self, state: Any, step: int | None = None) -> None:
        """End the trace (also when the run ends inside the window)."""
        if not self.active:
            return
        try:
            jax.block_until_ready(state)
        except Exception:  # the run failed and its state is gone: the trace ends here all the same
            pass
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as err:  # e.g. a full disk while the trace is written: the run goes on
            print(f"flaxvision: warning: the profile could not be written: {type(err).__name__}: {err}")
            return
        assert self.window is not None
        if self.is_main:
            last = step if step is not None else "the end"
            print(f"flaxvision: profile of steps {self.window[0] + 1}-{last} written to {self.directory} "
                  f"(view: tensorboard --logdir {self.directory}, or perfetto_trace.json.gz in ui.perfetto.dev)")


def peak_memory(device: Any) -> tuple[int | None, str]:
    """(peak bytes, of what): the device's peak allocation where the backend reports it (GPU, TPU), else the
    process's peak resident memory (the CPU backend keeps no allocator statistics)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    if stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"


def hardware() -> dict[str, Any]:
    """What the run ran on: JAX's platform and device kind, device and process counts, the host's CPU model."""
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "cpu": cpu_model(),
    }


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None
