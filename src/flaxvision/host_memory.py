"""Host memory on Linux/glibc: huge pages for XLA:CPU's buffers, and the compiler's freed memory given back.

Huge pages, through glibc's `glibc.malloc.hugetlb=1` tunable.

XLA:CPU allocates each step's activations and gradients afresh, and glibc hands such large blocks back to the
kernel when they are freed, so every step faults in gigabytes of fresh 4 KiB pages: ViT-B/16 at batch 8 takes
~690k page faults per train step, about 13% of the step on this project's 2-core machine (BENCHMARKS.md). With
the tunable, glibc asks for transparent huge pages and the faults drop to a few thousand per step. glibc reads
tunables only when a process starts, so the CLI's compute commands re-run themselves with it set
(`restart_with_huge_pages`); a Python program can be started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
Linux with glibc >= 2.35 and THP not disabled; FLAXVISION_HUGE_PAGES=0 turns it off.

Freed memory given back: XLA's compiler frees hundreds of MB of small blocks that glibc keeps in its heap, where
the step's large buffers cannot reuse them; `trim_after_compiles` hands them back to the kernel (`malloc_trim`)
after every compilation, before the new program first runs. ViT-B/16 train step at batch 8: peak RSS -375 MB.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from typing import Any

TUNABLE = "glibc.malloc.hugetlb=1"


def _supported() -> bool:
    if sys.platform != "linux":
        return False
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()  # None (not glibc): ValueError
        if name != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return False
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except (ValueError, OSError, AttributeError):
        return False


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """A copy of `environ` with the tunable added, or None when it is set already, turned off or unsupported."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("FLAXVISION_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables or not _supported():
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def restart_with_huge_pages() -> None:
    """Replace this process by the same command line with the tunable set (returns when there is nothing to do)."""
    env = environment()
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


_libc: Any = None
_listening = False


def release_free_memory() -> None:
    """Return the heap's free memory to the kernel (glibc's malloc_trim); nothing elsewhere."""
    global _libc
    if sys.platform != "linux":
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only (musl has no malloc_trim)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def trim_after_compiles() -> None:
    """Call `release_free_memory` after every XLA compilation in this process (idempotent)."""
    global _listening
    if _listening or sys.platform != "linux":
        return
    import jax.monitoring

    def on_event(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            release_free_memory()

    jax.monitoring.register_event_duration_secs_listener(on_event)
    _listening = True


def memory_limit_bytes(device: Any) -> tuple[int, str] | None:
    """(bytes, what) the device can hold: an accelerator's memory, or for the CPU the machine's RAM (cgroup too)."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        return (int(limit), f"{device.device_kind} memory") if limit else None
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    return (min(limits), "this machine's memory") if limits else None
