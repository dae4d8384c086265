"""Random erasing (timm's `RandomErasing` semantics) on the uint8 image, in the grain worker.

With probability `prob` an image gets 1 box, or with `max_count` > 1 a uniform 1..max_count boxes; each box has an
area fraction uniform in [0.02, 1/3] / count and a log-uniform aspect ratio (height / width) in [0.3, 1/0.3]; up
to 10 tries per box for one that fits strictly inside the image (none fits: that box is left out), at a uniform
position. Boxes may overlap. These are timm's defaults (`--reprob`, `--remode`, `--recount`).

timm erases the normalised tensor: "pixel" with per-pixel N(0, 1) noise, "rand" with one N(0, 1) value per channel,
"const" with 0. This runs before normalisation, on uint8, so the fill values are the uint8 values that normalise to
those: mean * 255 + std * 255 * z, rounded and clipped to [0, 255] ("const": the mean, rint(mean * 255)). The
clip saturates the noise's tails: with ImageNet's mean/std beyond 1.8 to 2.6 sigma (a few % of the pixels),
with mean = std = 0.5 beyond +-1 sigma (about a third of them). Draws come only from the numpy Generator passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flaxvision.errors import ConfigError

ERASE_MODES = ("pixel", "rand", "const")
AREA = (0.02, 1 / 3)
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
TRIES = 10


def check_erasing(prob: float, mode: str, max_count: int) -> None:
    """Raise a one-line ConfigError for an unusable random erasing setting."""
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"random erasing: reprob must be in [0, 1], got {prob}")
    if mode not in ERASE_MODES:
        raise ConfigError(f"random erasing: remode must be one of {', '.join(ERASE_MODES)}, got {mode!r}")
    if max_count < 1:
        raise ConfigError(f"random erasing: recount must be >= 1, got {max_count}")


def erasing_boxes(height: int, width: int, max_count: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """The boxes (top, left, h, w) of one erasing: 1..max_count of them (fewer when a box finds no fit in 10 tries)."""
    count = 1 if max_count == 1 else int(rng.integers(1, max_count + 1))
    area = height * width
    boxes = []
    for _ in range(count):
        for _ in range(TRIES):
            target = rng.uniform(*AREA) * area / count
            aspect = math.exp(rng.uniform(*LOG_ASPECT))
            h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                boxes.append((top, left, h, w))
                break
    return boxes


def random_erase(array: np.ndarray, rng: np.random.Generator, *, prob: float, mode: str, max_count: int,
                 mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Random erasing of a uint8 (H, W, C) array with the model's normalisation `mean`, `std` (in [0, 1]).

    Returns the array itself when nothing is erased, else an erased copy.
    """
    if rng.random() >= prob:
        return array
    height, width, channels = array.shape
    centre = np.asarray(mean, np.float64) * 255.0
    spread = np.asarray(std, np.float64) * 255.0
    out = np.array(array)
    for top, left, h, w in erasing_boxes(height, width, max_count, rng):
        if mode == "pixel":
            z = rng.standard_normal((h, w, channels))
        elif mode == "rand":
            z = rng.standard_normal(channels)
        else:
            z = np.zeros(channels)
        out[top:top + h, left:left + w] = np.rint(centre + spread * z).clip(0, 255).astype(np.uint8)
    return out
