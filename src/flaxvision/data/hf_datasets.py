"""Hub datasets, `save_to_disk` directories and parquet files: all read through `datasets`, all Arrow-backed.

Images stay in the memory-mapped Arrow table (`ArrowImages`), so sending a split to worker processes costs a file
name. Image and label columns are detected by name and feature type, or named by the caller.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.data.image_source import RawSplit
from flaxvision.errors import FlaxvisionError, did_you_mean

IMAGE_COLUMNS = ("image", "img", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


class ArrowImages:
    """Images in an Arrow column: an Image struct {bytes, path}, raw binary, a path string, or a nested array."""

    def __init__(self, table: Any, column: str, root: str | None = None):
        self.table = table  # a datasets.table.Table: pickles as file names + replays when memory-mapped
        self.column = column
        self.root = root  # where relative paths in the column are resolved
        self._chunks: list[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"table": self.table, "column": self.column, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _locate(self, row: int) -> tuple[Any, int]:
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = self.table.table.column(self.column).chunks
            self._offsets = np.cumsum([0] + [len(c) for c in chunks])
        c = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return chunks[c], row - int(self._offsets[c])

    def get(self, row: int) -> Any:
        import pyarrow as pa

        chunk, j = self._locate(row)
        kind = chunk.type
        if pa.types.is_struct(kind):
            data = chunk.field("bytes")[j].as_py() if kind.get_field_index("bytes") >= 0 else None
            if data is None and kind.get_field_index("path") >= 0:
                path = chunk.field("path")[j].as_py()
                return self._resolve(path) if path else b""
            return data or b""
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return chunk[j].as_py() or b""
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return self._resolve(chunk[j].as_py() or "")
        return np.asarray(chunk[j].as_py())

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) or self.root is None else os.path.join(self.root, path)

    def describe(self, row: int) -> str:
        import pyarrow as pa

        chunk, j = self._locate(row)
        if pa.types.is_struct(chunk.type) and chunk.type.get_field_index("path") >= 0:
            path = chunk.field("path")[j].as_py()
            if path:
                return f"row {row} ({path})"
        return f"row {row}"


def parquet_files(spec: str) -> list[str]:
    """The files a parquet spec names: one file, a glob, or a comma-separated list of either."""
    files: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if not part.endswith(".parquet"):
            return []
        found = sorted(glob.glob(os.path.expanduser(part)))
        if not found:
            return []
        files += found
    return files


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(v, "").lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hf_splits(spec: str, kind: str, cache_dir: str | None) -> tuple[dict[str, Any], str | None]:
    """The spec as {split: datasets.Dataset}, plus the directory that relative image paths are resolved against."""
    import datasets

    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(spec)
            root = spec
        elif kind == "parquet":
            path = Path(os.path.expanduser(spec))
            if path.is_dir():
                loaded, root = datasets.load_dataset("parquet", data_dir=str(path), cache_dir=cache_dir), str(path)
            else:
                files = parquet_files(spec)
                loaded = datasets.load_dataset("parquet", data_files={"train": files}, cache_dir=cache_dir)
                root = str(Path(files[0]).parent)
        else:
            loaded, root = datasets.load_dataset(spec, cache_dir=cache_dir), None
    except FlaxvisionError:
        raise
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if kind == "hub" and _offline():
            raise FlaxvisionError(
                f"Hub dataset {spec!r} is not in the local cache and offline mode is on (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE); run once with network access to cache it, or unset the offline variables"
            ) from err
        where = "Hub dataset" if kind == "hub" else f"{kind} dataset"
        raise FlaxvisionError(f"cannot load {where} {spec!r}: {type(err).__name__}: {first_line}") from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}, root
    return {str(name): split for name, split in loaded.items()}, root


def _pick_column(names: Sequence[str], features: Any, wanted: str | None, candidates: Sequence[str], what: str,
                 feature_type: type | None, spec: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise FlaxvisionError(
                f"dataset {spec!r} has no {what} column {wanted!r}{did_you_mean(wanted, names)}; "
                f"columns: {', '.join(names)}"
            )
        return wanted
    for name in candidates:
        if name in names:
            return name
    if feature_type is not None:
        for name in names:
            if isinstance(features.get(name), feature_type):
                return name
    flag = "--image-column" if what == "image" else "--label-column"
    raise FlaxvisionError(
        f"cannot find the {what} column of dataset {spec!r} among {', '.join(names)}; name it with {flag}"
    )


def read_hf(spec: str, kind: str, image_column: str | None, label_column: str | None,
             cache_dir: str | None) -> dict[str, RawSplit]:
    import datasets

    splits, root = _hf_splits(spec, kind, cache_dir)
    first = next(iter(splits.values()))
    names, features = list(first.column_names), first.features
    image_col = _pick_column(names, features, image_column, IMAGE_COLUMNS, "image", datasets.Image, spec)
    label_col = _pick_column(names, features, label_column, LABEL_COLUMNS, "label", datasets.ClassLabel, spec)
    label_feature = features.get(label_col)
    string_names: list[str] | None = None
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        string_names = sorted({str(v) for ds in splits.values() for v in ds.unique(label_col)})
    raw = {}
    for split, ds in splits.items():
        if ds._indices is not None:  # a selected/shuffled view: materialise it so rows are physical rows
            ds = ds.flatten_indices()
        column = ds.data.column(label_col)
        if string_names is not None:
            lookup = {n: i for i, n in enumerate(string_names)}
            labels = np.asarray([lookup[str(v)] for v in column.to_pylist()], dtype=np.int64)
        else:
            labels = column.to_numpy().astype(np.int64) if len(column) else np.zeros(0, np.int64)
        if isinstance(label_feature, datasets.ClassLabel):
            class_names = tuple(label_feature.names)
        elif string_names is not None:
            class_names = tuple(string_names)
        else:
            top = max((int(ds.data.column(label_col).to_numpy().max()) for ds in splits.values() if len(ds)), default=-1)
            class_names = tuple(str(i) for i in range(top + 1))
        raw[split] = RawSplit(ArrowImages(ds.data, image_col, root), labels, class_names)
    return raw
