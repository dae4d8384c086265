"""Small generated image datasets for tests, demos and the input-pipeline benchmark (no download needed).

`photo` draws a cheap photograph-like picture (smooth colour field, a few soft shapes, sensor-like noise), so that
JPEG sizes and decode times resemble real photos; `write_image_folder` writes a split/class/image tree of them.
`class_images` draws a learnable classification set (class templates, shifts, noise) and `write_class_dataset`
saves it like ylecun/mnist or uoft-cs/cifar10, for `flaxvision bench e2e`.

    >>> from flaxvision.data.synthetic import write_image_folder
    >>> root = write_image_folder("/tmp/food101-like", num_classes=101, per_split={"train": 30, "validation": 10})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _noise_texture(seed: int, side: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 10.0, (side, side, 1)).astype(np.int16)


def photo(rng: np.random.Generator, width: int, height: int, noise: np.ndarray | None = None) -> Image.Image:
    """A photograph-like RGB picture of width x height; `noise` (a texture at least that large) adds grain."""
    base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1, y1 = x0 + int(rng.integers(width // 8, width // 2)), y0 + int(rng.integers(height // 8, height // 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    base = base.filter(ImageFilter.GaussianBlur(2))
    if noise is None:
        return base
    top, left = int(rng.integers(0, noise.shape[0] - height + 1)), int(rng.integers(0, noise.shape[1] - width + 1))
    pixels = np.asarray(base, np.int16) + noise[top:top + height, left:left + width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_image_folder(
    root: str | os.PathLike,
    *,
    num_classes: int = 101,
    per_split: Mapping[str, int] | None = None,
    max_side: int = 512,
    min_side: int = 288,
    quality: int = 85,
    seed: int = 0,
) -> Path:
    """Write root/<split>/class_XXX/<n>.jpg: photo-like JPEGs whose longer side is `max_side` (Food-101 style).

    Args:
      root: output directory (created).
      num_classes: number of class directories (class_000, class_001, ...).
      per_split: images per class in each split (default {"train": 8, "validation": 2}).
      max_side, min_side: the longer side is max_side; the shorter one is drawn from [min_side, max_side].
      quality: JPEG quality.
      seed: makes the images reproducible.
    """
    root = Path(root)
    per_split = dict(per_split or {"train": 8, "validation": 2})
    rng = np.random.default_rng(seed)
    noise = _noise_texture(seed, max(1024, max_side))
    for split, count in per_split.items():
        for label in range(num_classes):
            class_dir = root / split / f"class_{label:03d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                short = int(rng.integers(min_side, max_side + 1))
                size = (max_side, short) if rng.random() < 0.5 else (short, max_side)
                photo(rng, *size, noise=noise).save(class_dir / f"{i:05d}.jpg", quality=quality)
    return root


def folder_to_disk(folder: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Save an image folder (split/class/image) as a `datasets.save_to_disk` directory with the image bytes
    embedded (an Image column and a ClassLabel column, as Hub datasets have); return `target`."""
    import datasets

    folder, target = Path(folder), Path(target)
    splits = sorted(d for d in folder.iterdir() if d.is_dir())
    names = sorted({c.name for split in splits for c in split.iterdir() if c.is_dir()})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    tables = {}
    for split in splits:
        rows: dict[str, list] = {"image": [], "label": []}
        for label, name in enumerate(names):
            for path in sorted((split / name).glob("*")) if (split / name).is_dir() else []:
                rows["image"].append({"bytes": path.read_bytes(), "path": f"{name}/{path.name}"})
                rows["label"].append(label)
        tables[split.name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(tables).save_to_disk(str(target))
    return target


# --------------------------------------------------------------------------------------------------------------
# A learnable classification set (`flaxvision bench e2e --generate N`)

def class_images(n: int, *, side: int, channels: int, num_classes: int = 10, seed: int = 0,
                 split: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` uint8 images (n, side, side, channels) and their int64 labels, drawn around one template per class.

    Each class's template is a blob pattern (a coarse random field, upsampled and thresholded, one per channel);
    an image is its class's template shifted by up to side/7 pixels, at a random contrast, over a faint shifted
    template of another class, plus strong pixel noise. Learnable, not trivial: the nearest class mean is right
    about 2/3 of the time, and the MNIST CNN (AdamW 0.005, batch 32) reaches ~90% test accuracy after 12,000
    training images. The templates depend on `seed` only, the images on (`seed`, `split`): a train and a test
    split share their classes.
    """
    templates = _class_templates(side, channels, num_classes, seed)
    rng = np.random.default_rng([seed, split + 1])
    shift = max(side // 7, 1)
    padded = np.pad(templates, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    labels = rng.integers(0, num_classes, n)
    others = (labels + rng.integers(1, num_classes, n)) % num_classes
    grid = np.arange(side)
    images = np.empty((n, side, side, channels), np.uint8)
    for start in range(0, n, 8192):  # in chunks: the float noise of 50k CIFAR-sized images would take 600 MB
        stop = min(start + 8192, n)
        k = stop - start

        def shifted(classes: np.ndarray) -> np.ndarray:
            dy, dx = rng.integers(0, 2 * shift + 1, (2, len(classes)))
            rows, cols = (dy[:, None] + grid)[:, :, None], (dx[:, None] + grid)[:, None, :]
            return padded[classes[:, None, None], rows, cols]  # (k, side, side, channels)

        contrast = rng.uniform(0.4, 1.0, (k, 1, 1, 1)).astype(np.float32)
        faint = rng.uniform(0.0, 0.6, (k, 1, 1, 1)).astype(np.float32)
        tint = rng.uniform(0.7, 1.0, (k, 1, 1, channels)).astype(np.float32)
        pixels = (contrast * shifted(labels[start:stop]) + faint * shifted(others[start:stop])) * tint * 200.0
        pixels += rng.normal(30.0, 60.0, pixels.shape).astype(np.float32)
        images[start:stop] = np.clip(pixels, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def _class_templates(side: int, channels: int, num_classes: int, seed: int) -> np.ndarray:
    """(num_classes, side, side, channels) float32 in [0, 1]: soft-edged blobs covering about a third of the image."""
    rng = np.random.default_rng([seed, 0])
    coarse = max(side // 5, 2)
    out = np.empty((num_classes, side, side, channels), np.float32)
    for c in range(num_classes):
        for ch in range(channels):
            field = rng.normal(size=(coarse, coarse)).astype(np.float32)
            smooth = np.asarray(Image.fromarray(field, mode="F").resize((side, side), Image.Resampling.BICUBIC))
            threshold = np.quantile(smooth, 0.65)
            out[c, :, :, ch] = np.clip((smooth - threshold) * 3.0 + 0.5, 0.0, 1.0)
    return out


def write_class_dataset(target: str | os.PathLike, *, train: int, test: int, side: int, channels: int,
                        num_classes: int = 10, seed: int = 0) -> Path:
    """Write `class_images` as a `datasets.save_to_disk` directory shaped like ylecun/mnist or uoft-cs/cifar10:
    train and test splits, an Image column of PNGs (mode L or RGB) and a ClassLabel column ("0", "1", ...).

    60,000 MNIST-sized images take about 10 s on one core (most of it PNG encoding); returns `target`.
    """
    import io

    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(num_classes)])})
    tables = {}
    for split, (name, count) in enumerate((("train", train), ("test", test))):
        images, labels = class_images(count, side=side, channels=channels, num_classes=num_classes, seed=seed,
                                      split=split)  # fmt: skip
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            # compress_level 1: a fast encode; the files are small either way and decode as fast.
            Image.fromarray(image[:, :, 0] if channels == 1 else image).save(buffer, format="PNG", compress_level=1)
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        tables[name] = datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per split that lasts a blink
    try:
        datasets.DatasetDict(tables).save_to_disk(str(target))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return Path(target)
