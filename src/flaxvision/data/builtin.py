"""Datasets that ship inside installed packages, for runs with no network: `builtin:digits`.

The first use writes the images once as a `datasets.save_to_disk` directory under the flaxvision cache
(FLAXVISION_CACHE, default ~/.cache/flaxvision), so they then flow through exactly the same pipeline as any other
dataset on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError, did_you_mean

PREFIX = "builtin:"


def _digits() -> tuple[list[np.ndarray], list[int], list[str]]:
    """scikit-learn's 1,797 8 x 8 handwritten digits (UCI optical recognition), as uint8 grayscale."""
    from sklearn.datasets import load_digits

    digits: Any = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return list(images), [int(t) for t in digits.target], [str(i) for i in range(10)]


BUILTINS: dict[str, Callable[[], tuple[list[np.ndarray], list[int], list[str]]]] = {"digits": _digits}
_VERSION = "v1"  # bump when a builtin's content changes, so caches are rebuilt


def cache_root() -> Path:
    return Path(os.environ.get("FLAXVISION_CACHE", Path.home() / ".cache" / "flaxvision"))


def is_builtin(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def materialize(spec: str) -> str:
    """Path of the `save_to_disk` directory for `builtin:NAME`, writing it on first use."""
    name = spec[len(PREFIX) :]
    if name not in BUILTINS:
        raise FlaxvisionError(f"unknown built-in dataset {spec!r}{did_you_mean(name, BUILTINS)}; built-ins: "
                              + ", ".join(PREFIX + n for n in BUILTINS))  # fmt: skip
    target = cache_root() / "builtin" / f"{name}-{_VERSION}"
    if (target / "dataset_dict.json").exists():
        return str(target)
    import datasets

    images, labels, names = BUILTINS[name]()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a concurrent or interrupted first use never leaves half a dataset.
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    datasets.DatasetDict({"train": table}).save_to_disk(str(scratch / "data"))
    try:
        os.replace(scratch / "data", target)
    except OSError:  # another process finished first
        pass
    shutil.rmtree(scratch, ignore_errors=True)
    return str(target)
