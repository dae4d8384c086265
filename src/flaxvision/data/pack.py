"""`flaxvision data pack`: any dataset flaxvision reads into WebDataset or ArrayRecord shards with a manifest.

    pack("ethz/food101", "/data/food101-wds", kind="wds", shard_size=1 << 30, resize=256, quality=90)

Layout of the output (read back by `flaxvision.data.load(DIR)`, local or from object storage):

    DIR/manifest.json              format, kind, class names, per split: count, per-class counts, its shards
                                   (path, count, bytes, sha256, per-class counts) and its index file
    DIR/<split>/<split>-000000.tar WebDataset: <key>.<jpg|png|...> + <key>.cls (the class number) per sample
    DIR/<split>/<split>-000000.array_record   ArrayRecord: one record per sample (shards.encode_record)
    DIR/<split>/index.npz          per example: shard, offset, size, label (one ranged read per example)

The key of a sample is its row in the source split, so a reported bad image names the original. `resize=S`
shrinks images whose shorter side is over S to S (Lanczos) and stores them as JPEG of `quality` (smaller shards,
faster decoding); other images keep their original bytes. An image that cannot be decoded is left out and listed
in the manifest. Everything is written under a temporary name beside DIR, which takes its place only when all of
it is done: a failed or interrupted pack leaves no partial DIR.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import re
import socket
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision import files
from flaxvision.data import shard_index, shards
from flaxvision.data.image_source import RawSplit
from flaxvision.errors import FlaxvisionError

FORMATS = ("wds", "arrayrecord")
_SUFFIX = {"wds": ".tar", "arrayrecord": ".array_record"}
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
_CHUNK = 64  # images per task sent to a worker
_OWNER = ".flaxvision-pack-owner.json"  # in a pack's temporary directory while it is being written: host and pid


def _remove_stale_partials(out: Path) -> None:
    """Remove what packs into `out` that were killed left beside it (their temporary directories, the size of the
    dataset): those whose owner process on this host is gone. A live pack's, or another host's, are left alone."""
    import shutil

    for partial in out.parent.glob(f".{out.name}.*.tmp"):
        try:
            owner = json.loads((partial / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # not a pack's, or its owner file was never written: not ours to judge
        if owner.get("host") != socket.gethostname():
            continue
        try:
            os.kill(int(owner["pid"]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, KeyError, ValueError, TypeError):
            continue
        print(f"flaxvision: removing {partial}, left by a pack into {out} that was killed", file=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not match:
        raise FlaxvisionError(f"--shard-size {text!r}: use a size like 1GB, 512MB or 64MiB")
    number, unit = float(match.group(1)), (match.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    if unit not in scale:
        raise FlaxvisionError(f"--shard-size {text!r}: unknown unit; use B, kB, MB, GB or KiB, MiB, GiB")
    size = int(number * scale[unit])
    if size < 1024:
        raise FlaxvisionError(f"--shard-size {text!r} is under 1 kB; shards that small only add overhead")
    return size


def encode(value: Any, resize: int | None, quality: int) -> tuple[bytes, str] | str:
    """An image as the source holds it (bytes, a file path or an array) -> (file bytes, extension), or why not."""
    from PIL import Image

    try:
        if isinstance(value, str):
            with open(value, "rb") as f:
                data = f.read()
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        else:
            array = np.asarray(value)
            if array.dtype != np.uint8:
                array = np.clip(array, 0, 255).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(png, format="PNG")
            data = png.getvalue()
        with Image.open(io.BytesIO(data)) as image:
            ext = _PIL_EXT.get(image.format or "", "png")
            if resize is None or min(image.size) <= resize:
                image.verify()
                return data, ext
            image = image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB")
            w, h = image.size
            scale = resize / min(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
            return out.getvalue(), "jpg"
    except Exception as err:  # any decoder error: the image is left out and listed
        return f"{type(err).__name__}: {err}"


_worker_images: Any = None  # a worker process's split storage, sent once when the worker starts


def _start_worker(images: Any) -> None:
    global _worker_images
    _worker_images = images


def _encode_rows(images: Any, rows: list[int], resize: int | None, quality: int) -> list[tuple[bytes, str] | str]:
    images = _worker_images if images is None else images
    return [encode(images.get(r), resize, quality) for r in rows]


class _ShardWriter:
    """Writes one split's shards, rolling to the next file at `shard_size` bytes."""

    def __init__(self, root: Path, split: str, kind: str, shard_size: int, class_names: tuple[str, ...]):
        self.root, self.split, self.kind, self.shard_size = root, split, kind, shard_size
        self.class_names = class_names
        self.shards: list[dict[str, Any]] = []
        self.index: dict[str, list[int]] = {"shard": [], "offset": [], "size": [], "label": [], "key": []}
        self._writer: Any = None
        self._bytes = 0
        self._labels: list[int] = []
        (root / split).mkdir()

    def _open(self) -> None:
        name = f"{self.split}/{self.split}-{len(self.shards):06d}{_SUFFIX[self.kind]}"
        self._path = self.root / name
        if self.kind == "wds":
            self._writer = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in _close)
        else:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._writer = ArrayRecordWriter(str(self._path), "group_size:1")
        self.shards.append({"path": name})
        self._bytes, self._labels, self._sizes, self._keys = 0, [], [], []

    def add(self, key: str, label: int, data: bytes, ext: str) -> None:
        if self._writer is None:
            self._open()
        writer: Any = self._writer
        if self.kind == "wds":
            for suffix, payload in ((ext, data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                writer.addfile(info, io.BytesIO(payload))
        else:
            record = shards.encode_record(label, key, ext, data)
            writer.write(record)
            self._sizes.append(len(record))
        self._labels.append(label)
        self._keys.append(int(key))
        self._bytes += len(data) + 1024
        if self._bytes >= self.shard_size:
            self._close()

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        s = len(self.shards) - 1
        if self.kind == "wds":  # where each image landed: the tar's own headers (and a check of what was written)
            found, broken = shard_index._scan_tar(str(self._path))
            if broken:
                raise FlaxvisionError(f"the shard just written, {self._path}, does not read back: {broken}")
            images = [next(m[e] for e in shards.IMAGE_EXTENSIONS if e in m) for m in found.values()]
            offsets, sizes = [o for o, _ in images], [n for _, n in images]
        else:
            offsets, sizes = list(range(len(self._labels))), self._sizes
        count = len(self._labels)
        self.index["shard"] += [s] * count
        self.index["offset"] += offsets
        self.index["size"] += sizes
        self.index["label"] += self._labels
        self.index["key"] += self._keys
        digest = hashlib.sha256()
        with open(self._path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        per_class = np.bincount(np.asarray(self._labels, np.int64), minlength=len(self.class_names))
        self.shards[-1].update(count=count, bytes=self._path.stat().st_size, sha256=digest.hexdigest(),
                               class_counts={n: int(c) for n, c in zip(self.class_names, per_class) if c})  # fmt: skip

    def finish(self) -> dict[str, Any]:
        self._close()
        arrays = {k: np.asarray(v, np.int32 if k == "shard" else np.int64) for k, v in self.index.items()}
        buffer = io.BytesIO()
        np.savez(buffer, shard=arrays["shard"], offset=arrays["offset"], size=arrays["size"], label=arrays["label"],
                 key=arrays["key"])  # fmt: skip
        files.write_atomic(self.root / self.split / "index.npz", buffer.getvalue())
        per_class = np.bincount(arrays["label"], minlength=len(self.class_names))
        return {"count": int(len(arrays["label"])), "index": f"{self.split}/index.npz", "shards": self.shards,
                "class_counts": {n: int(c) for n, c in zip(self.class_names, per_class)}}  # fmt: skip


def pack(source: str, out: str | os.PathLike, *, kind: str = "wds", shard_size: int = 1 << 30, resize: int | None = None,
         quality: int = 90, splits: list[str] | None = None, workers: int = 0, image_column: str | None = None,
         label_column: str | None = None, overwrite: bool = False, progress: bool = True, seed: int | None = 0) -> Path:  # fmt: skip
    """Pack every labelled split of `source` (or `splits`) into shards under `out`; return `out`.

    The examples are written in a random order seeded by `seed` (None: the source's order): sources are often
    sorted by class (an image folder is), and a process reading a run of class-sorted shards through a bounded
    shuffle buffer would see few classes per batch."""
    from flaxvision.data.sources import _read

    if kind not in FORMATS:
        raise FlaxvisionError(f"--format {kind!r}: use wds or arrayrecord")
    if resize is not None and resize < 8:
        raise FlaxvisionError(f"--resize {resize}: the shorter side must be at least 8 pixels")
    if not 1 <= quality <= 100:
        raise FlaxvisionError(f"--quality {quality}: use 1..100 (JPEG quality)")
    if workers < 0:
        raise FlaxvisionError(f"--workers {workers}: use 0 (this process) or more")
    if kind == "arrayrecord":
        shard_index.check_array_record()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlaxvisionError(f"--out {out} is a file; pass a directory to create")
    if out.exists() and not overwrite and not files.is_empty_dir(out):
        raise FlaxvisionError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
    raw = _read(source, image_column, label_column, None, False)
    chosen = splits or [name for name, split in raw.items() if len(split.labels) and not (split.labels < 0).all()]
    missing = [s for s in chosen if s not in raw]
    if missing:
        raise FlaxvisionError(f"{source!r} has no split {missing[0]!r}; its splits: {', '.join(raw)}")
    if not chosen:
        raise FlaxvisionError(f"{source!r} has no labelled split to pack")
    class_names = raw[chosen[0]].class_names
    total = sum(len(raw[s].labels) for s in chosen)
    started = time.perf_counter()
    _remove_stale_partials(out)
    with files.atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / _OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        manifest: dict[str, Any] = {"format": shards.MANIFEST_FORMAT, "version": 1, "kind": kind,
                                    "class_names": list(class_names), "source": source, "resize": resize,
                                    "quality": quality if resize else None, "order_seed": seed, "splits": {}, "skipped": {}}  # fmt: skip
        bar = _progress(total, progress)
        try:
            for split in chosen:
                manifest["splits"][split], manifest["skipped"][split] = _pack_split(
                    raw[split], tmp, split, kind, shard_size, class_names, resize, quality, workers, bar, seed)
        finally:
            bar.close()
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / _OWNER).unlink()
        files.write_atomic(tmp / shards.MANIFEST, json.dumps(manifest, indent=1))
    return out


def _pack_split(split: RawSplit, root: Path, name: str, kind: str, shard_size: int, class_names: tuple[str, ...],
                resize: int | None, quality: int, workers: int, bar: Any, seed: int | None) -> tuple[dict[str, Any], list]:  # fmt: skip
    writer = _ShardWriter(root, name, kind, shard_size, class_names)
    labelled = np.flatnonzero(split.labels >= 0)
    if seed is not None:
        labelled = np.random.default_rng([seed, len(labelled)]).permutation(labelled)
    rows = [int(r) for r in labelled]
    chunks = [rows[i:i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
    skipped = []

    def results():
        if workers == 0:
            for chunk in chunks:
                yield chunk, _encode_rows(split.images, chunk, resize, quality)
            return
        context = multiprocessing.get_context("spawn")  # (no fork of a process that may hold threads)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                    initargs=(split.images,)) as pool:  # fmt: skip
            ahead = 4 * workers  # chunks in flight: order kept, memory bounded
            futures = [pool.submit(_encode_rows, None, chunk, resize, quality) for chunk in chunks[:ahead]]
            for i, chunk in enumerate(chunks):
                done = futures[i].result()
                if i + ahead < len(chunks):
                    futures.append(pool.submit(_encode_rows, None, chunks[i + ahead], resize, quality))
                futures[i] = None  # type: ignore[call-overload]
                yield chunk, done

    for chunk, encoded in results():
        for row, item in zip(chunk, encoded):
            if isinstance(item, str):
                skipped.append({"row": row, "where": split.images.describe(row), "reason": item})
            else:
                writer.add(f"{row:09d}", int(split.labels[row]), item[0], item[1])
        bar.update(len(chunk))
    return writer.finish(), skipped


def _progress(total: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="packing", disable=not show, dynamic_ncols=True)
