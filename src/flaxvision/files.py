"""Writing files so that a reader never sees half of one: temp file in the same directory, fsync, rename.

Every file flaxvision writes goes through here (or, for directories, `atomic_directory`). A new file gets the
permissions an ordinary `open(path, "w")` would give it (0666 less the umask; `mkstemp` alone would give 0600), an
existing file keeps its own. A write that fails for lack of space, a read-only or vanished directory becomes one
`StorageError` line naming the path and the free space; the previous content of the file stays as it was.

    >>> write_json(run_dir / "summary.json", summary)
    >>> with atomic_directory(out, overwrite=False) as tmp:   # build the directory in tmp; renamed into place
    ...     save_pretrained(model, tmp)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxvision.errors import FlaxvisionError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()
_NEW_DIR_MODE = 0o777 & ~_umask()


class StorageError(FlaxvisionError):
    """The file system refused a write: full, read-only, vanished or not permitted."""


def free_space(path: str | os.PathLike) -> str:
    """Free space on the file system of `path` (or of its nearest existing parent), e.g. '12.0 MB free'."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit} free"
    return f"{free} bytes free"


def storage_error(err: OSError, path: str | os.PathLike, doing: str = "write") -> StorageError:
    """One line for an OSError met while writing `path`: what, where, the free space, and what to do."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOENT: "the directory vanished",
    }.get(err.errno or -1, err.strerror or str(err))
    return StorageError(f"cannot {doing} {path}: {reason} ({free_space(path)}); free space or choose another directory")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` in one step: readers see the old file or the new one, never a part."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    except OSError as err:
        raise storage_error(err, path) from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise storage_error(err, path) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, None when there is no such file; unreadable or malformed is one FlaxvisionError line."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FlaxvisionError(f"cannot read {path}: {err}; restore the file, or start afresh") from None


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    return write_atomic(path, json.dumps(value, indent=indent) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single O_APPEND write (a log: rewriting it whole per record would be quadratic).

    A process killed mid-write can leave at most a torn last line, which `read_lines` ignores.
    """
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _NEW_FILE_MODE)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(fd)
    except OSError as err:
        raise storage_error(err, path) from None


def read_lines(path: str | os.PathLike) -> list[str]:
    """The complete lines of a file written by `append_line` (a torn last line is left out)."""
    text = Path(path).read_text()
    lines = text.split("\n")
    return [line for line in lines[:-1] if line.strip()]  # the part after the last newline is incomplete


def make_dirs(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, path, "create") from None
    return path


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory on the file system of `parent` (so that renames out of it are atomic), removed after."""
    make_dirs(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".flaxvision-", suffix=".tmp", dir=parent))
    except OSError as err:
        raise storage_error(err, parent, "create a temporary directory in") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_empty_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `path`; on success it replaces `path` in one rename.

    `path` must not exist, or be empty, unless `overwrite`; on failure nothing at `path` changes and the
    temporary directory is removed.
    """
    path = Path(path)
    if path.exists() and not overwrite and not is_empty_dir(path):
        raise FlaxvisionError(f"{path} already exists and is not empty; pass --overwrite to replace it")
    make_dirs(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, _NEW_DIR_MODE)
    except OSError as err:
        raise storage_error(err, path) from None
    try:
        yield tmp
        old = None
        if path.exists() and overwrite:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)  # without overwrite this fails when another process filled `path` since the check
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not overwrite and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FlaxvisionError(f"{path} was filled by another process meanwhile and is kept as it is; nothing of "
                                  "this one was written (pass --overwrite to replace it)") from None  # fmt: skip
        raise storage_error(err, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
