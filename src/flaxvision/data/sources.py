"""Where images come from: a Hub dataset, a `save_to_disk` directory, parquet files or an image-folder tree.

Every kind becomes the same thing: an `ImageSource` per split, random access to the *encoded* image (bytes, a file
path or an array) and its label, plus the class names. Nothing is decoded here; decoding happens in the pipeline's
workers. This module picks the reader (`hf_datasets` for Hub / disk / parquet, `image_folder` for folders), then
selects splits and classes, holds out validation when there is none, and checks what a classifier needs.

    >>> data = flaxvision.data.load("ethz/food101", classes=20)
    >>> len(data.train), data.class_names[:2]
    (15000, ('apple_pie', 'baby_back_ribs'))
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxvision.data import builtin
from flaxvision.data.hf_datasets import parquet_files, read_hf
from flaxvision.data.image_folder import read_folder
from flaxvision.data.image_source import DatasetSplits, ImageSource, RawSplit
from flaxvision.data.transforms import BadImage, probe_image
from flaxvision.errors import FlaxvisionError, did_you_mean

__all__ = ["VAL_SPLITS", "DatasetSplits", "ImageSource", "load", "resolve_kind", "stratified_split"]

log = logging.getLogger("flaxvision.data")

VAL_SPLITS = ("validation", "val", "valid", "test")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBES = 8  # images decoded up front to find the channel count and catch a dataset with no usable image


# --------------------------------------------------------------------------------------------------------------
# Which reader a spec needs


def resolve_kind(spec: str) -> str:
    """Which kind of source a spec names: "disk", "parquet", "folder" or "hub".

    An existing directory is a `save_to_disk` directory when it has dataset_dict.json or state.json, a parquet
    directory when it holds .parquet files, else an image folder. Existing .parquet files (one, a glob, or a
    comma-separated list) are "parquet". Anything else that looks like `owner/name` (or `name`) is a Hub dataset id.

    Raises:
      FlaxvisionError: the spec is neither an existing path nor a Hub id.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "disk"
        if next(path.rglob("*.parquet"), None) is not None:
            return "parquet"
        return "folder"
    if parquet_files(spec):
        return "parquet"
    if path.exists():
        raise FlaxvisionError(
            f"dataset {spec!r} is a file but not a .parquet file; pass a Hub id, a save_to_disk directory, "
            "parquet file(s) or an image folder (split/class/image)"
        )
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)
    if _HUB_ID.match(spec) and not looks_local:
        return "hub"
    raise FlaxvisionError(
        f"dataset {spec!r} does not exist as a path and is not a Hub dataset id (owner/name); "
        "check the path, or pass e.g. ethz/food101"
    )


# --------------------------------------------------------------------------------------------------------------
# Selection: splits, class subsets, held-out validation, sample caps


def _select_classes(class_names: tuple[str, ...], classes: int | Sequence[str] | None, spec: str) -> list[int]:
    if classes is None:
        return list(range(len(class_names)))
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if isinstance(classes, int):
        if not 1 <= classes <= len(class_names):
            raise FlaxvisionError(
                f"classes={classes} but dataset {spec!r} has {len(class_names)} classes; pass 1..{len(class_names)}"
            )
        return list(range(classes))
    index = {name: i for i, name in enumerate(class_names)}
    chosen = []
    for name in classes:
        if name not in index:
            raise FlaxvisionError(
                f"dataset {spec!r} has no class {name!r}{did_you_mean(name, class_names)}; "
                f"its classes start with {', '.join(class_names[:5])}"
            )
        if index[name] not in chosen:
            chosen.append(index[name])
    if not chosen:
        raise FlaxvisionError("classes is empty; pass a count or at least one class name")
    return chosen


def _subset(raw: RawSplit, keep: list[int], name: str) -> ImageSource:
    remap = np.full(len(raw.class_names), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    rows = np.flatnonzero(remap[raw.labels] >= 0)
    return ImageSource(
        name=name,
        class_names=tuple(raw.class_names[k] for k in keep),
        labels=remap[raw.labels[rows]],
        ids=rows.astype(np.int64),
        num_channels=3,
        images=raw.images,
    )


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, held_out): `fraction` of every class held out, chosen at random with `seed`.

    Each class with at least 2 examples gives round(fraction x count) examples, at least 1 and never all of them;
    both outputs are sorted, so the split is the same for the same labels and seed.
    """
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(rng.permutation(members)[:count])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


def _cap(source: ImageSource, limit: int | None, seed: int, what: str) -> ImageSource:
    if limit is None or limit >= len(source):
        return source
    if limit < 1:
        raise FlaxvisionError(f"{what} must be >= 1, got {limit}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(source))[:limit])
    return source.select(keep)


def _check_labels(raw: RawSplit, spec: str, split: str) -> None:
    bad = (raw.labels < 0) | (raw.labels >= len(raw.class_names))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise FlaxvisionError(
            f"dataset {spec!r} split {split!r} has label {int(raw.labels[row])} at row {row}, outside the "
            f"{len(raw.class_names)} classes (0..{len(raw.class_names) - 1}); unlabeled splits (label -1) cannot be "
            "used for training or validation: pick another split"
        )


def _probe(source: ImageSource) -> int:
    """Channel count of the source from a few fully decoded images; raises when none of them is usable."""
    if len(source) == 0:
        raise FlaxvisionError(f"{source.name} has no examples; check the split and the class subset")
    positions = np.unique(np.linspace(0, len(source) - 1, num=min(_PROBES, len(source))).astype(int))
    channels, errors = [], []
    for pos in positions:
        try:
            channels.append(probe_image(source[int(pos)]["image"]))
        except BadImage as err:
            errors.append(f"{source.describe(int(source.ids[pos]))}: {err}")
    if not channels:
        raise FlaxvisionError(
            f"{source.name}: none of the {len(positions)} images checked could be read ({errors[0]}); "
            "is the image column right?"
        )
    return 1 if all(c == 1 for c in channels) else 3


def _check_classes(train: ImageSource, val: ImageSource) -> None:
    """A training split needs two classes; a class it has that validation lacks is never measured (a warning)."""
    present = np.unique(train.labels)
    if len(present) < 2:
        only = train.class_names[int(present[0])]
        raise FlaxvisionError(
            f"{train.name} has only one class ({only!r}); a classifier needs at least two: add examples of "
            "another class, or check the classes / max_train_samples you passed"
        )
    missing = sorted(set(present.tolist()) - set(np.unique(val.labels).tolist()))
    if missing:
        names = ", ".join(repr(train.class_names[i]) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        log.warning("%s has no example of class(es) %s%s that %s trains on; their accuracy is never measured",
                    val.name, names, more, train.name)


def _read(spec: str, image_column: str | None, label_column: str | None, cache_dir: str | None,
          streaming: bool) -> dict[str, RawSplit]:  # fmt: skip
    from flaxvision.data.shard_sources import open_sharded, sharded_kind

    kind = sharded_kind(spec)
    if kind is None and streaming:
        kind = resolve_kind(spec)
        if kind not in ("parquet", "hub"):
            raise FlaxvisionError(f"--streaming reads parquet files or a Hub dataset in place; {spec!r} is a {kind} "
                                  "dataset: drop --streaming, or pack it into shards with flaxvision data pack")  # fmt: skip
    if kind is not None:
        warnings: list[str] = []
        raw = open_sharded(spec, kind, image_column=image_column, label_column=label_column, log=warnings)
        for line in warnings:
            log.warning("%s", line)
        return raw
    kind = resolve_kind(spec)
    return read_folder(spec) if kind == "folder" else read_hf(spec, kind, image_column, label_column, cache_dir)


def load(
    spec: str,
    *,
    train_split: str | None = None,
    val_split: str | None = None,
    classes: int | Sequence[str] | None = None,
    max_train_samples: int | None = None,
    max_val_samples: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
    streaming: bool = False,
) -> DatasetSplits:
    """Open a dataset for training and validation.

    Args:
      spec: a Hub dataset id (ethz/food101), a `save_to_disk` directory, a .parquet file / glob / directory of
        parquet files, an image folder (root/split/class/image, or root/class/image for one split), or a dataset
        that an installed package ships (builtin:digits).
      train_split: the training split (default "train").
      val_split: the validation split (default "validation", else "val", "valid" or "test", skipping unlabeled
        ones; when there is none, a stratified `val_fraction` of the training split, chosen with `seed`).
      classes: keep the first N class ids (an int), or the named classes (a list, or "a,b,c"); labels are remapped
        to 0..N-1 in that order and the names kept.
      max_train_samples, max_val_samples: keep a random subset (chosen with `seed`) of at most this many examples.
      image_column, label_column: column names, when detection (image/img, label/labels/fine_label) is not enough.
      val_fraction: the held-out fraction when there is no validation split.
      seed: seed of the held-out split and the sample caps.
      cache_dir: the `datasets` cache for Hub and parquet data (default: HF_DATASETS_CACHE).
      streaming: read parquet files or a Hub dataset's parquet files in place (no copy into the cache), each
        process its own files. Tar shards and `flaxvision data pack` directories are always read so
        (data/shard_sources.py has the spec syntax).

    A class of the training split that the validation split lacks is logged as a warning.

    Raises:
      FlaxvisionError: unknown spec, dataset not cached while offline, missing split or column, a label outside
        the class list, no usable images, an image folder's class directory without images, a training split
        with fewer than two classes.
    """
    if builtin.is_builtin(spec):  # e.g. builtin:digits, written once to the cache as a save_to_disk directory
        spec = builtin.materialize(spec)
    raw = _read(spec, image_column, label_column, cache_dir, streaming)
    available = list(raw)
    train_name = train_split or "train"
    if train_name not in raw:
        raise FlaxvisionError(
            f"dataset {spec!r} has no split {train_name!r}{did_you_mean(train_name, available)}; "
            f"splits: {', '.join(available)}"
        )
    if val_split is not None and val_split not in raw:
        raise FlaxvisionError(
            f"dataset {spec!r} has no split {val_split!r}{did_you_mean(val_split, available)}; "
            f"splits: {', '.join(available)} (leave out the validation split to hold out {val_fraction:.0%} of train)"
        )
    unlabeled = {name for name, r in raw.items() if len(r.labels) and (r.labels < 0).all()}  # e.g. a hidden test set
    val_name = val_split or next((s for s in VAL_SPLITS if s in raw and s != train_name and s not in unlabeled), None)
    for split in {train_name, val_name} - {None}:
        _check_labels(raw[split], spec, split)
    keep = _select_classes(raw[train_name].class_names, classes, spec)
    train = _subset(raw[train_name], keep, f"{spec}[{train_name}]")
    if val_name is not None:
        val = _subset(raw[val_name], keep, f"{spec}[{val_name}]")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise FlaxvisionError(f"val_fraction must be in (0, 1), got {val_fraction}")
        train_pos, val_pos = stratified_split(train.labels, val_fraction, seed)
        val = dataclasses.replace(train.select(val_pos), name=f"{spec}[{train_name} held-out {val_fraction:g}]")
        train = train.select(train_pos)
    train = _cap(train, max_train_samples, seed, "max_train_samples")
    val = _cap(val, max_val_samples, seed + 1, "max_val_samples")
    channels = _probe(train)
    _check_classes(train, val)
    train = dataclasses.replace(train, num_channels=channels)
    val = dataclasses.replace(val, num_channels=channels)
    return DatasetSplits(train, val, train.class_names, channels, spec, val_held_out=val_name is None)
