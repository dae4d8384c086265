"""Where each example of a sharded dataset lies: from a `flaxvision data pack` manifest and its index files, or
by one pass over WebDataset tar headers or parquet footers (data/shards.py reads the examples)."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.data.image_source import RawSplit
from flaxvision.data.shards import (
    IMAGE_EXTENSIONS,
    KINDS,
    MANIFEST,
    MANIFEST_FORMAT,
    ShardImages,
    _open_binary,
    is_remote,
)
from flaxvision.errors import FlaxvisionError

MAX_CLASSES = 1_000_000  # .cls values from 0 to this (ImageNet-21k has 21,843 classes)

# --------------------------------------------------------------------------------------------------------------
# Indexes: from a pack manifest, or by reading tar headers / parquet footers


def read_manifest(root: str) -> dict[str, RawSplit]:
    """The splits of a `flaxvision data pack` directory (local or remote), from its manifest and index files."""
    text = _read_text(_join(root, MANIFEST))
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise FlaxvisionError(f"{_join(root, MANIFEST)} is not valid JSON ({err}); re-run flaxvision data pack") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or manifest.get("kind") not in KINDS:
        raise FlaxvisionError(f"{_join(root, MANIFEST)} is not a flaxvision shard manifest; point --dataset at the "
                              "directory `flaxvision data pack` wrote")  # fmt: skip
    names, splits = manifest.get("class_names"), manifest.get("splits")
    if not isinstance(splits, dict) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FlaxvisionError(f"{_join(root, MANIFEST)} has no class_names list or splits (a damaged manifest); "
                              "re-run flaxvision data pack")  # fmt: skip
    if manifest["kind"] == "arrayrecord":
        check_array_record(root)
    out = {}
    for split, info in splits.items():
        paths, index = _split_index(root, split, info)
        keys = index.get("key")  # the source row of each example (packs written with it)
        images = ShardImages(manifest["kind"], paths, index["shard"], index["offset"], index["size"], keys=keys)
        out[split] = RawSplit(images=images, labels=index["label"].astype(np.int64), class_names=tuple(names))
    return out


def _split_index(root: str, split: str, info: Any) -> tuple[list[str], dict[str, np.ndarray]]:
    """A manifest split's shard paths and index arrays, checked against each other and the manifest's count: a
    damaged index or a lost local shard is one error at open, not a crash (or every image of a shard skipped) later."""
    where = f"split {split!r} of {_join(root, MANIFEST)}"
    try:
        paths = [_join(root, s["path"]) for s in info["shards"]]
        count, index_path = int(info["count"]), _join(root, info["index"])
        with _open_binary(index_path) as f:
            loaded = np.load(io.BytesIO(f.read()))
            index = {k: np.asarray(loaded[k]) for k in ("shard", "offset", "size", "label", "key")
                     if k != "key" or k in loaded.files}  # fmt: skip
    except Exception as err:  # whatever the damage (a missing key or file, not a zip, pickled data): one line
        raise FlaxvisionError(f"{where}: cannot read its shards or index ({type(err).__name__}: {err}); re-run "
                              "flaxvision data pack") from None  # fmt: skip
    lengths = sorted({v.size if v.ndim == 1 else -1 for v in index.values()})
    if lengths != [count]:
        raise FlaxvisionError(f"{where}: its index {index_path} holds {lengths} entries, the manifest counts {count}; "
                              "re-run flaxvision data pack")  # fmt: skip
    if count and not 0 <= index["shard"].min() <= index["shard"].max() < len(paths):
        raise FlaxvisionError(f"{where}: its index {index_path} names shard {int(index['shard'].max())} of "
                              f"{len(paths)}; re-run flaxvision data pack")  # fmt: skip
    missing = [p for p in paths if not is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise FlaxvisionError(f"{where} lists shard {missing[0]}, which does not exist; restore it, or re-run "
                              "flaxvision data pack")  # fmt: skip
    return paths, index


def check_array_record(where: str | None = None) -> None:
    """ArrayRecord needs the array_record package (grain's dependency on Linux) and a local or mounted path (its
    reader opens file names only)."""
    import importlib.util

    if importlib.util.find_spec("array_record") is None:
        raise FlaxvisionError("ArrayRecord shards need the array_record package: pip install array-record")
    if where is not None and is_remote(where):
        raise FlaxvisionError(f"{where}: ArrayRecord shards are read from a local or mounted file system only "
                              "(array_record opens file names); mount the bucket (gcsfuse, s3fs-fuse) or pack "
                              "with --format wds")  # fmt: skip


def _join(root: str, relative: str) -> str:
    return root.rstrip("/") + "/" + relative if is_remote(root) else os.path.join(root, relative)


def _read_text(path: str) -> str:
    try:
        with _open_binary(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise FlaxvisionError(f"{path} does not exist; pass a directory written by flaxvision data pack") from None
    except OSError as err:
        raise FlaxvisionError(f"cannot read {path}: {err}") from None


def scan_tars(paths: list[str], class_names: tuple[str, ...] | None = None) -> tuple[RawSplit, list[str]]:
    """The samples of WebDataset tar shards (key.<image ext> with key.cls holding the class number), by one pass over
    the tar headers; (split, warnings). A truncated shard keeps the samples before the damage (a warning says how
    many were found); a sample without an image or a label is left out (counted in a warning)."""
    shard, offset, size, labels, keys, warnings = [], [], [], [], [], []
    for s, path in enumerate(paths):
        found, broken = _scan_tar(path)
        incomplete, duplicates = 0, [m["duplicate"] for m in found.values() if "duplicate" in m]
        for key, members in found.items():
            if "duplicate" in members:
                continue
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            label = members.get("cls_value")
            if image is None or label is None:
                incomplete += 1
                continue
            shard.append(s)
            offset.append(image[0])
            size.append(image[1])
            labels.append(label)
            keys.append(key)
        if broken:
            warnings.append(f"{path}: {broken}; read the {len(found)} samples before it")
        if incomplete:
            warnings.append(f"{path}: {incomplete} sample(s) without an image or a .cls label left out")
        if duplicates:
            warnings.append(f"{path}: {len(duplicates)} key(s) with a member twice (first {duplicates[0]}) left out; "
                            "give every sample its own key")  # fmt: skip
    if not shard:
        raise FlaxvisionError(f"no samples with an image and a .cls label in {paths[0]}{' ...' if len(paths) > 1 else ''}; "
                              "WebDataset shards hold key.jpg (or .png, .webp) + key.cls per sample")  # fmt: skip
    labels_np = np.asarray(labels, np.int64)
    top = int(labels_np.max())
    if top >= MAX_CLASSES:  # a class number that size is an id of something else; its name list would not fit
        at = int(labels_np.argmax())
        raise FlaxvisionError(f"{paths[shard[at]]}: sample {keys[at]} has .cls {top}, beyond {MAX_CLASSES - 1:,} classes; "
                              ".cls holds the class number 0..K-1 of each sample")  # fmt: skip
    if class_names is None:
        class_names = tuple(str(i) for i in range(top + 1))
    images = ShardImages("wds", paths, np.asarray(shard), np.asarray(offset), np.asarray(size), keys=keys)
    return RawSplit(images=images, labels=labels_np, class_names=class_names), warnings


def _scan_tar(path: str) -> tuple[dict[str, dict[str, Any]], str | None]:
    """{key: {ext: (data offset, size), "cls_value": int}} of one tar, and what stopped the scan early (or None)."""
    found: dict[str, dict[str, Any]] = {}
    with _open_binary(path) as f:
        total = f.seek(0, os.SEEK_END)
        f.seek(0)
        try:
            archive = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 (closed below; iterating reads headers)
        except tarfile.TarError as err:
            return found, f"not a readable tar ({err})"
        broken = None
        try:
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                key = member.name[: len(member.name) - len(name)] + key
                if member.offset_data + member.size > total:
                    broken = f"truncated at byte {total}, inside {member.name}"
                    break
                entry = found.setdefault(key, {})
                ext = ext.lower()
                if ext in entry:  # a second key.ext: which image goes with which label is unknown
                    entry.setdefault("duplicate", member.name)
                entry[ext] = (member.offset_data, member.size)
                if ext == "cls":
                    handle = archive.extractfile(member)
                    text = handle.read().decode("utf-8", "replace").strip() if handle else ""
                    if re.fullmatch(r"-?\d+", text):
                        entry["cls_value"] = int(text)
            if broken is None:  # a whole tar ends with two zero blocks; without them it was cut at a header
                f.seek(archive.offset)
                tail = f.read(1024)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    broken = f"truncated at byte {total} (no end-of-archive marker)"
        except (tarfile.TarError, OSError, EOFError) as err:
            broken = f"unreadable after {len(found)} samples ({err})"
        finally:
            archive.close()
    return found, broken


def parquet_shards(paths: list[str], image_column: str | None, label_column: str | None,
                   warnings: list[str] | None = None) -> RawSplit:  # fmt: skip
    """A parquet shard set read in place: positions from each file's footer (row groups), labels from the label
    column alone, class names from the Hub's feature metadata (else "0".."K-1"). A file that cannot be read (a
    truncated one has no footer; a row group that does not decode) is left out, with a line in `warnings`."""
    import pyarrow.parquet as pq

    from flaxvision.data.hf_datasets import IMAGE_COLUMNS, LABEL_COLUMNS

    shard, group, row, labels = [], [], [], []
    names: tuple[str, ...] | None = None
    image_col = None
    for s, path in enumerate(paths):
        try:
            found = _parquet_file(pq, path, image_column, label_column, IMAGE_COLUMNS, LABEL_COLUMNS)
        except FlaxvisionError:
            raise
        except Exception as err:  # pyarrow's errors for a damaged file: the shard is left out, the rest is read
            (warnings if warnings is not None else []).append(
                f"{path}: unreadable parquet shard left out ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})")
            continue
        image_col, file_names, file_labels = found
        names = names or file_names
        for g, values in enumerate(file_labels):
            shard.append(np.full(len(values), s))
            group.append(np.full(len(values), g))
            row.append(np.arange(len(values)))
            labels.append(values)
    if not labels:
        raise FlaxvisionError(f"none of the parquet shards could be read ({paths[0]}{' ...' if len(paths) > 1 else ''}); "
                              "check the files")  # fmt: skip
    all_labels = np.concatenate(labels).astype(np.int64)
    names = names or tuple(str(i) for i in range(int(all_labels.max()) + 1))
    images = ShardImages("parquet", paths, np.concatenate(shard), np.concatenate(group), np.concatenate(row), column=image_col)
    return RawSplit(images=images, labels=all_labels, class_names=names)


def _parquet_file(pq: Any, path: str, image_column: str | None, label_column: str | None, image_columns: Any,
                  label_columns: Any) -> tuple[str, tuple[str, ...] | None, list[np.ndarray]]:  # fmt: skip
    """(image column, class names from the metadata, the labels of each row group) of one parquet file."""
    with _open_binary(path) as f:
        pf = pq.ParquetFile(f)
        columns = pf.schema_arrow.names
        image_col = image_column or next((c for c in image_columns if c in columns), None)
        label_col = label_column or next((c for c in label_columns if c in columns), None)
        if image_col is None or label_col is None or image_col not in columns or label_col not in columns:
            raise FlaxvisionError(f"{path}: no image or label column among {', '.join(columns)}; pass "
                                  "--image-column / --label-column")  # fmt: skip
        groups = [pf.read_row_group(g, columns=[label_col]).column(0).to_numpy() for g in range(pf.num_row_groups)]
        for values in groups:
            if not np.issubdtype(values.dtype, np.integer):
                raise FlaxvisionError(f"{path}: the label column {label_col!r} holds {values.dtype} values, not class "
                                      "numbers; pass --label-column with the class-number column")  # fmt: skip
        return image_col, _hub_class_names(pf.schema_arrow.metadata, label_col), groups


def _hub_class_names(metadata: dict | None, label_column: str) -> tuple[str, ...] | None:
    """ClassLabel names from the "huggingface" schema metadata that `datasets` writes into its parquet files."""
    try:
        features = json.loads((metadata or {})[b"huggingface"])["info"]["features"]
        names = features[label_column].get("names")
        return tuple(names) if names else None
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def split_of(path: str) -> str:
    """The split a shard file belongs to by the Hub's and WebDataset's naming: data/train-00000-of-00004.parquet,
    validation/0000.parquet, food-val-000012.tar; "train" when the name says nothing."""
    parts = re.split(r"[/_.-]", Path(path).as_posix().lower())
    for split, words in (("validation", ("validation", "valid", "val")), ("test", ("test",)), ("train", ("train",))):
        if any(w in parts for w in words):
            return split
    return "train"
