"""The source types every dataset kind becomes: `ImageSource` (one split) and `DatasetSplits` (what `load` returns).

An `ImageSource` gives random access to the *encoded* image (bytes, a file path or an array) and the label of each
example; nothing is decoded here. `RawSplit` is what a reader (`hf_datasets`, `image_folder`) hands to `load`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class RawSplit:
    """One split as a reader found it: image storage (row -> encoded image), original labels, class names."""

    images: Any
    labels: np.ndarray  # int64, original ids
    class_names: tuple[str, ...]


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
    images: Any  # hf_datasets.ArrowImages | image_folder.FileImages: row -> encoded image

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
