"""Sharded datasets read in place: WebDataset tar shards, ArrayRecord shards and parquet shard sets, on a local
disk or remote storage (s3://, gs://, hf://, ... through fsspec), each process reading only its share.

    flaxvision.data.load("/data/food101-packed")                 # a `flaxvision data pack` directory (manifest.json)
    flaxvision.data.load("/data/train-{000000..000099}.tar")     # WebDataset shards: key.jpg + key.cls per sample
    flaxvision.data.load("s3://bucket/food101-packed")            # the same, remote (needs s3fs installed)
    flaxvision.data.load("ethz/food101", streaming=True)          # the Hub's parquet files, read in place

Every kind becomes a `RawSplit` whose images are a `ShardImages`: row -> the encoded image, read with one seek and
one read from its shard (the byte range of a tar member, an ArrayRecord record, a parquet row group). Where each
example lies comes from the pack manifest's index, or, for shards flaxvision did not write, from one pass over the
tar headers or the parquet footers and label column when the dataset is opened (remote tars: pack them first).

The loader (`flaxvision.data.pipeline`) sees `images.streaming` and gives each process a contiguous run of the
epoch's shard-shuffled sequence (data/shard_order.py): its own shards, read near-sequentially through a bounded
shuffle buffer. A member that cannot be read (a truncated tar, a vanished remote shard after retries, a broken
record) is a `BadImage`: skipped and counted like an undecodable image, never the end of a run.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any

import numpy as np

from flaxvision.data.transforms import BadImage
from flaxvision.errors import FlaxvisionError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "flaxvision-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
KINDS = ("wds", "arrayrecord", "parquet")
_REMOTE_TRIES = 3  # reads from remote storage are retried (0.5 s, 1 s between tries) before a member counts as bad
_DEAD_SECONDS = 60.0  # after a remote shard failed every retry, its other members count as bad without retrying
_OPEN_FILES = 8  # open shard files kept per process (a worker reads a few neighbouring shards at a time)


# --------------------------------------------------------------------------------------------------------------
# Locations: local paths, remote URLs, brace patterns


def is_remote(path: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", path)) and not path.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` -> a-000.tar ... a-003.tar (zero padding kept); `{a,b}` lists; several braces nest."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    inner, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        if int(hi) < int(lo):
            raise FlaxvisionError(f"shard pattern {pattern!r}: the range {{{inner}}} counts down; write {{{hi}..{lo}}}")
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = inner.split(",")
    return [p for choice in choices for p in expand_braces(head + choice + tail)]


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it); a missing filesystem package is one clear error."""
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:
        scheme = path.split("://", 1)[0]
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme, f"the fsspec {scheme} filesystem")
        raise FlaxvisionError(f"cannot read {path}: {scheme}:// needs {package} ({err}); pip install {package}") from None
    return fs, inner


def resolve_shards(pattern: str) -> list[str]:
    """The shard files a pattern names (braces expanded, then globs), sorted; none is an error naming the pattern."""
    found: list[str] = []
    for part in expand_braces(pattern):
        if any(c in part for c in "*?["):
            fs, inner = filesystem(part)
            matches = sorted(fs.glob(inner))
            found += [fs.unstrip_protocol(m) if is_remote(part) else m for m in matches]
        else:
            found.append(part)
    missing = [p for p in found if not is_remote(p) and not os.path.isfile(p)]
    if missing or not found:
        shown = missing[0] if missing else pattern
        raise FlaxvisionError(f"shard {shown} does not exist (pattern {pattern!r}); check the path and the {{a..b}} range")
    return found


# --------------------------------------------------------------------------------------------------------------
# Row -> encoded image, read in place


class ShardImages:
    """Encoded images in shard files: row -> bytes, with one ranged read from its shard.

    `shard[row]` indexes `paths`; `offset`/`size` locate the bytes: a tar member's data (byte offset, length), an
    ArrayRecord record (record number, length), a parquet row (row group, row in the group). Pickles as its
    arrays and paths (open files stay with the process that opened them).
    """

    streaming = True

    def __init__(self, kind: str, paths: list[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 keys: list[str] | np.ndarray | None = None, column: str | None = None):  # fmt: skip
        self.kind, self.paths, self.column = kind, list(paths), column
        self.shard = np.asarray(shard, np.int32)
        self.offset, self.size = np.asarray(offset, np.int64), np.asarray(size, np.int64)
        self.keys = keys
        self._open: dict[int, Any] = {}
        self._groups: dict[tuple[int, int], Any] = {}
        self._dead: dict[int, tuple[float, str]] = {}  # remote shards that failed every retry: (when, why)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_groups", "_dead", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open, self._groups, self._dead, self._lock = {}, {}, {}, threading.Lock()

    def __len__(self) -> int:
        return len(self.shard)

    def close(self) -> None:
        """Close the shard files this process opened (the next read opens them again)."""
        with self._lock:
            for s in list(self._open):
                self._forget(s)

    def __del__(self) -> None:
        if hasattr(self, "_lock"):
            self.close()

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return self.shard[np.asarray(rows, np.int64)]

    def describe(self, row: int) -> str:
        path = self.paths[int(self.shard[row])]
        if self.keys is None:
            return f"{path} #{row}"
        key = self.keys[row]
        return f"{path} (row {int(key)} of the packed source)" if isinstance(key, (int, np.integer)) else f"{path} {key}"

    def get(self, row: int) -> bytes:
        s = int(self.shard[row])
        path = self.paths[s]
        failed = self._dead.get(s)
        if failed is not None and time.monotonic() - failed[0] < _DEAD_SECONDS:  # its other members fail at once
            raise BadImage(f"cannot read it from {path}: {failed[1]} (the shard failed {_REMOTE_TRIES} reads just now)")
        tries = _REMOTE_TRIES if is_remote(path) else 1
        for attempt in range(tries):
            try:
                return self._read(row)
            except BadImage:
                raise
            except Exception as err:  # an I/O error of any filesystem: retried when remote, then a bad image
                with self._lock:
                    self._forget(s)
                if attempt + 1 == tries:
                    why = f"{type(err).__name__}: {err}"
                    if tries > 1:
                        self._dead[s] = (time.monotonic(), why)
                    raise BadImage(f"cannot read it from {path}: {why}") from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _file(self, s: int) -> Any:
        """The open shard (under the lock): a file descriptor for a local tar (read with pread: no shared file
        position between decoding threads), else the reader object."""
        handle = self._open.get(s)
        if handle is None:
            if len(self._open) >= _OPEN_FILES:
                self._forget(next(iter(self._open)))
            path = self.paths[s]
            if self.kind == "arrayrecord":
                from array_record.python.array_record_module import ArrayRecordReader  # (checked by read_manifest)

                handle = ArrayRecordReader(path, "readahead_buffer_size:0")
            elif self.kind == "parquet":
                import pyarrow.parquet as pq

                handle = pq.ParquetFile(path if not is_remote(path) else _open_binary(path))
            else:
                handle = os.open(path, os.O_RDONLY) if not is_remote(path) else _open_binary(path)
            self._open[s] = handle
        return handle

    def _forget(self, s: int) -> None:
        handle = self._open.pop(s, None)
        self._groups = {k: v for k, v in self._groups.items() if k[0] != s}
        try:
            if isinstance(handle, int):
                os.close(handle)
            elif self.kind == "parquet" and handle is not None:
                handle.close(force=True)  # (also the fsspec file a remote one reads)
            elif handle is not None and hasattr(handle, "close"):
                handle.close()
        except Exception:  # closing a broken handle: nothing left to save
            pass

    def _read(self, row: int) -> bytes:
        s, offset, size = int(self.shard[row]), int(self.offset[row]), int(self.size[row])
        with self._lock:
            handle = self._file(s)
            if self.kind == "wds" and isinstance(handle, int):
                data = os.pread(handle, size, offset)  # (under the lock: the descriptor may be closed and reused)
            elif self.kind == "wds":
                handle.seek(offset)
                data = handle.read(size)
            elif self.kind == "arrayrecord":
                (data,) = handle.read([offset])
            else:
                group = self._groups.get((s, offset))
                if group is None:
                    if len(self._groups) >= 2 * _OPEN_FILES:
                        self._groups.pop(next(iter(self._groups)))
                    group = self._groups[(s, offset)] = handle.read_row_group(offset, columns=[self.column])
                return _parquet_image(group.column(0)[size].as_py())
        if self.kind == "arrayrecord":
            return decode_record(data)[1]
        if len(data) != size:
            raise BadImage(f"{self.paths[s]} ends after {offset + len(data)} bytes, inside this member (a truncated shard)")
        return data


def _open_binary(path: str) -> Any:
    if not is_remote(path):
        return open(path, "rb")  # noqa: SIM115 (kept open: the shard is read member by member)
    fs, inner = filesystem(path)
    return fs.open(inner, "rb", block_size=4 << 20, cache_type="readahead")


def _parquet_image(value: Any) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise BadImage("the parquet row holds no image bytes")
    return value


# --------------------------------------------------------------------------------------------------------------
# ArrayRecord records: a JSON header line, then the encoded image


def encode_record(label: int, key: str, ext: str, image: bytes) -> bytes:
    """One ArrayRecord record as `flaxvision data pack` writes it: b'{"label": 3, "key": "...", "ext": "jpg"}\\n'
    followed by the image file's bytes (readable without flaxvision: split at the first newline)."""
    return json.dumps({"label": int(label), "key": key, "ext": ext}).encode() + b"\n" + image


def decode_record(record: bytes) -> tuple[dict[str, Any], bytes]:
    head, sep, image = record.partition(b"\n")
    try:
        meta = json.loads(head) if sep else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise BadImage("the record has no flaxvision header line")
    return meta, image
