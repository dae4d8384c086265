"""Image-folder datasets: root/<split>/<class>/<image> (or root/<class>/<image>) trees of image files.

The class names are the directory names (sorted); the images stay files (`FileImages`), read by the workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxvision.data.image_source import RawSplit
from flaxvision.data.transforms import IMAGE_SUFFIXES
from flaxvision.errors import FlaxvisionError

SPLIT_DIRS = ("train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev")


class FileImages:
    """Images as files: paths relative to a root directory."""

    def __init__(self, root: str, paths: Sequence[str]):
        self.root = root
        self.paths = np.asarray(paths, dtype=object)

    def get(self, row: int) -> str:
        return os.path.join(self.root, self.paths[row])

    def describe(self, row: int) -> str:
        return str(self.paths[row])


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def read_folder(spec: str) -> dict[str, RawSplit]:
    """The splits of an image folder: root/<split>/<class>/<image> (split directories named train, val, test, ...)
    or root/<class>/<image> (one split, "train"). Images may sit in subdirectories of their class directory.

    Raises:
      FlaxvisionError: no class directories, or a class directory without a single image.
    """
    root = Path(os.path.expanduser(spec))
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.lower() in SPLIT_DIRS]
    layout = {d: root / d for d in split_dirs} if split_dirs else {"train": root}
    class_names = sorted({
        c.name for split_root in layout.values() for c in split_root.iterdir()
        if c.is_dir() and not c.name.startswith(".")
    })
    if not class_names:
        raise FlaxvisionError(
            f"image folder {spec!r} has no class directories; expected {spec}/<split>/<class>/<image> "
            f"or {spec}/<class>/<image>"
        )
    class_index = {name: i for i, name in enumerate(class_names)}
    raw = {}
    for split, split_root in layout.items():
        paths, labels = [], []
        for name in class_names:
            class_dir = split_root / name
            if not class_dir.is_dir():
                continue
            found = len(paths)
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames.sort()
                for filename in sorted(filenames):
                    if _is_image_file(filename):
                        paths.append(os.path.relpath(os.path.join(dirpath, filename), root))
                        labels.append(class_index[name])
            if len(paths) == found:  # a class with no examples would train a label that can never be right
                where = os.path.join(spec, os.path.relpath(class_dir, root))
                raise FlaxvisionError(
                    f"{where} holds no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); "
                    "remove the folder or add images"
                )
        split_name = "validation" if split.lower() in ("val", "valid") else split
        raw[split_name] = RawSplit(FileImages(str(root), paths), np.asarray(labels, np.int64), tuple(class_names))
    return raw
