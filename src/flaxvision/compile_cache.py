"""JAX's persistent compilation cache, on by default for the command line: a repeated run loads its compiled
steps from disk instead of compiling them again (seconds for a ViT-B/16 train step; see BENCHMARKS.md).

Where: $FLAXVISION_COMPILE_CACHE, else $XDG_CACHE_HOME/flaxvision/jax-cache (~/.cache/flaxvision/jax-cache).
`--no-compile-cache` on any command, or FLAXVISION_COMPILE_CACHE=off, turns it off; a JAX_COMPILATION_CACHE_DIR
already set is left as it is (JAX reads it itself). JAX keys each entry by the program, the jax/XLA versions and
the device, so a stale entry is never used; the directory is kept under a size cap, least recently used first.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_BYTES = 4 * 1024**3


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flaxvision" / "jax-cache"


def repair_orphans(directory: Path) -> int:
    """Give every entry that lacks its access-time file one (as least recently used); return how many.

    A process killed between writing an entry's two files leaves it without one, and with a size cap jax (0.10)
    then fails every later write to the whole cache (jax-ml/jax#39880, fixed in later releases).
    """
    repaired = 0
    try:
        for entry in directory.glob("*-cache"):
            atime = entry.with_name(entry.name[: -len("-cache")] + "-atime")
            if not atime.exists():
                atime.write_bytes((0).to_bytes(8, "little"))
                repaired += 1
    except OSError:
        pass
    return repaired


def configure(enabled: bool = True) -> Path | None:
    """Point JAX's persistent compilation cache at flaxvision's directory (before anything compiles).

    Returns the directory in use, or None when the cache is off or its directory cannot be written (then runs
    just compile, as without a cache).
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    setting = os.environ.get("FLAXVISION_COMPILE_CACHE", "")
    if not enabled or setting.lower() in ("off", "0", "false", "no"):
        return None
    directory = Path(setting).expanduser() if setting else default_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            return None
    except OSError:
        return None
    repair_orphans(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the small programs add up, too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
