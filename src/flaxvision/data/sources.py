"""Where images come from: a Hub dataset, a `save_to_disk` directory, parquet files or an image-folder tree.

Every kind becomes the same thing: an `ImageSource` per split, random access to the *encoded* image (bytes, a file
path or an array) and its label, plus the class names. Nothing is decoded here; decoding happens in the pipeline's
workers. Arrow-backed sources stay memory-mapped, so sending them to worker processes costs a file name.

    >>> data = flaxvision.data.load("ethz/food101", classes=20)
    >>> len(data.train), data.class_names[:2]
    (15000, ('apple_pie', 'baby_back_ribs'))
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.data import builtin
from flaxvision.data.transforms import BadImage, probe_image
from flaxvision.errors import FlaxvisionError, did_you_mean

IMAGE_COLUMNS = ("image", "img", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
VAL_SPLITS = ("validation", "val", "valid", "test")
_SPLIT_DIRS = ("train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev")
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga".split()
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBES = 8  # images decoded up front to find the channel count and catch a dataset with no usable image


# --------------------------------------------------------------------------------------------------------------
# Image storage backends: row -> encoded image. Both pickle cheaply (memory-mapped Arrow files, or paths).


class _ArrowImages:
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
        if self._chunks is None:
            chunks = self.table.table.column(self.column).chunks
            self._offsets = np.cumsum([0] + [len(c) for c in chunks])
            self._chunks = chunks
        c = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return self._chunks[c], row - int(self._offsets[c])

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


class _FileImages:
    """Images as files: paths relative to a root directory."""

    def __init__(self, root: str, paths: Sequence[str]):
        self.root = root
        self.paths = np.asarray(paths, dtype=object)

    def get(self, row: int) -> str:
        return os.path.join(self.root, self.paths[row])

    def describe(self, row: int) -> str:
        return str(self.paths[row])


# --------------------------------------------------------------------------------------------------------------
# The public source type


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """Random access to one split: `source[i]` is {"image": bytes | path | array, "label": int, "id": int}.

    `id` is the example's row in the original split (its file index for image folders): the number reported for a
    skipped image. It is a grain `RandomAccessDataSource` (len + getitem) and pickles cheaply.

    Attributes:
      name: "<spec>[<split>]", for messages and reports.
      class_names: names of the labels 0..N-1 (after any class subset).
      labels: int64 label of each example (remapped to 0..N-1).
      ids: int64 row of each example in the original split.
      num_channels: 1 for a grayscale dataset, else 3.
    """

    name: str
    class_names: tuple[str, ...]
    labels: np.ndarray
    ids: np.ndarray
    num_channels: int
    images: Any  # _ArrowImages | _FileImages

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.ids[index])
        return {"image": self.images.get(row), "label": int(self.labels[index]), "id": row}

    def __repr__(self) -> str:
        return f"ImageSource({self.name}, {len(self)} images, {len(self.class_names)} classes)"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self, example_id: int) -> str:
        """A human-readable location of the example with this id (a file path, or the row and its path)."""
        return f"{self.name} {self.images.describe(int(example_id))}"

    def select(self, positions: np.ndarray) -> ImageSource:
        """The examples at these positions (of this source), in this order."""
        positions = np.asarray(positions, dtype=np.int64)
        return dataclasses.replace(self, labels=self.labels[positions], ids=self.ids[positions])


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """What `load` returns: a train and a validation source that share the class names."""

    train: ImageSource
    val: ImageSource
    class_names: tuple[str, ...]
    num_channels: int
    spec: str
    val_held_out: bool  # True when `val` was carved out of the training split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------------------------------
# Reading a spec into raw splits


@dataclasses.dataclass
class _RawSplit:
    images: Any
    labels: np.ndarray  # int64, original ids
    class_names: tuple[str, ...]


def _parquet_files(spec: str) -> list[str]:
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
    if _parquet_files(spec):
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
                files = _parquet_files(spec)
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
        loaded = {"train": loaded}
    return dict(loaded), root


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


def _read_hf(spec: str, kind: str, image_column: str | None, label_column: str | None,
             cache_dir: str | None) -> dict[str, _RawSplit]:
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
        raw[split] = _RawSplit(_ArrowImages(ds.data, image_col, root), labels, class_names)
    return raw


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _read_folder(spec: str) -> dict[str, _RawSplit]:
    root = Path(os.path.expanduser(spec))
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.lower() in _SPLIT_DIRS]
    layout = {d: root / d for d in split_dirs} if split_dirs else {"train": root}
    class_names = sorted({
        c.name for split_root in layout.values() for c in split_root.iterdir()
        if c.is_dir() and not c.name.startswith(".")
    })
    if not class_names:
        raise FlaxvisionError(
            f"image folder {spec!r} has no class directories; expected {spec}/<split>/<class>/<image> "
            "or {spec}/<class>/<image>"
        )
    class_index = {name: i for i, name in enumerate(class_names)}
    raw = {}
    for split, split_root in layout.items():
        paths, labels = [], []
        for name in class_names:
            class_dir = split_root / name
            if not class_dir.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames.sort()
                for filename in sorted(filenames):
                    if _is_image_file(filename):
                        paths.append(os.path.relpath(os.path.join(dirpath, filename), root))
                        labels.append(class_index[name])
        split_name = "validation" if split.lower() in ("val", "valid") else split
        raw[split_name] = _RawSplit(_FileImages(str(root), paths), np.asarray(labels, np.int64), tuple(class_names))
    if not any(len(r.labels) for r in raw.values()):
        raise FlaxvisionError(
            f"image folder {spec!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class "
            "directories"
        )
    return raw


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


def _subset(raw: _RawSplit, keep: list[int], name: str) -> ImageSource:
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


def _check_labels(raw: _RawSplit, spec: str, split: str) -> None:
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

    Raises:
      FlaxvisionError: unknown spec, dataset not cached while offline, missing split or column, a label outside
        the class list, no usable images.
    """
    if builtin.is_builtin(spec):  # e.g. builtin:digits, written once to the cache as a save_to_disk directory
        spec = builtin.materialize(spec)
    kind = resolve_kind(spec)
    raw = _read_folder(spec) if kind == "folder" else _read_hf(spec, kind, image_column, label_column, cache_dir)
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
    train = dataclasses.replace(train, num_channels=channels)
    val = dataclasses.replace(val, num_channels=channels)
    return DatasetSplits(train, val, train.class_names, channels, spec, val_held_out=val_name is None)
