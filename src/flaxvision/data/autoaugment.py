"""RandAugment (timm's grammar and ops) and TrivialAugment Wide (torchvision's ops and magnitude bins) on the host.

Runs in grain's worker processes: PIL and numpy only (never jax or datasets). Every random choice (which ops, whether
each applies, the magnitude noise, the sign, the resampling filter) is drawn from the numpy Generator passed in, the
per-example one of `BatchMaker`: a resumed run draws exactly the same images, whatever the worker count. Neither
Python's `random` nor numpy's global state is ever used.

RandAugment strings follow timm's `rand_augment_transform`: "rand" and then dash-separated options in any order,
    m<int>     magnitude, default 10 (on timm's scale: magnitude / 10 is the fraction of each op's range)
    n<int>     ops per image, default 2 (drawn with replacement; without replacement for a weighted set)
    p<float>   probability that each drawn op applies, default 0.5
    mstd<float> std of Gaussian noise on the magnitude, per op; above 100: uniform in [0, m] (timm's "inf")
    mmax<int>  upper clip of the (noisy) magnitude, default 10
    inc<0|1>   1: the "increasing" op set, where a larger magnitude is always a stronger change (timm's inc1)
    t<name>    transform set: weights (timm's _RAND_WEIGHTED_0), 3a or 3aw (DeiT III's 3-Augment sets)
e.g. "rand-m9-mstd0.5-inc1" (the DeiT / ViT recipes). Magnitude -> parameter mappings (ranges, signs, the
increasing variants) are timm's; the op list of each set too.

Where this differs from timm, and why:
  * the parser is strict: timm skips a section without a digit ("rand-foo") and fails with a bare assertion on an
    unknown key; here both, a repeated key and a value out of range are one-line `ConfigError`s. timm's old `w`
    key (removed in timm 0.9) is an error that points to `tweights`; an unknown `t` set is an error (timm
    silently falls back to the default set); "mmax0" is an error (timm reads it as the default 10).
  * fill colour of the geometric ops: the model's mean colour, round(255 * mean) (what timm's create_transform
    passes as img_mean), so uncovered pixels normalise to about 0.
  * resampling of the geometric ops: bilinear or bicubic, drawn per op (timm's default `--train-interpolation
    random`).

TrivialAugment Wide follows torchvision's `TrivialAugmentWide`: one of 14 ops uniformly, one of 31 magnitude bins
uniformly, a random sign for the signed ops, applied once. Its constructor options are fixed here to bilinear
resampling (torchvision's classification reference recipe passes bilinear; the class default is nearest) and the
mean-colour fill above (torchvision's default fill is 0, black).

1-channel images: every op runs on the L image. Color, ColorIncreasing and Desaturate are the identity there (an L
image has no saturation to change), exactly as PIL's ImageEnhance.Color, and so timm and torchvision, behave.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from flaxvision.errors import ConfigError

Fill = int | tuple[int, ...]
_LEVEL_DENOM = 10.0  # timm's magnitude scale: level = magnitude / 10
_RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

# timm's op sets (timm/data/auto_augment.py: _RAND_TRANSFORMS, _RAND_INCREASING_TRANSFORMS, _RAND_3A, ...)
_GEOMETRY = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", *_GEOMETRY)  # fmt: skip
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", *_GEOMETRY)  # fmt: skip
_WEIGHTED_SETS = {
    "weights": {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1, "ColorIncreasing": 0.25,
                "SharpnessIncreasing": 0.25, "AutoContrast": 0.25, "SolarizeIncreasing": 0.05, "SolarizeAdd": 0.05,
                "ContrastIncreasing": 0.05, "BrightnessIncreasing": 0.05, "Equalize": 0.05,
                "PosterizeIncreasing": 0.05, "Invert": 0.05},
    "3aw": {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2, "ShearY": 2,
            "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1, "SharpnessIncreasing": 1,
            "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1, "Invert": 1},
}  # fmt: skip
_SETS = ("weights", "3a", "3aw")
_OPTIONS = "m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>, t<weights|3a|3aw>"


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed RandAugment string (see the module docstring for the grammar)."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # math.inf: uniform in [0, magnitude]
    magnitude_max: float = 10.0
    ops: tuple[str, ...] = RAND_OPS
    weights: tuple[float, ...] | None = None  # a weighted set: drawn without replacement with these probabilities


@functools.lru_cache(maxsize=64)
def parse_randaugment(text: str) -> RandAugmentSpec:
    """Parse timm's RandAugment grammar, e.g. "rand-m9-mstd0.5-inc1".

    Raises:
      ConfigError: one line naming the bad section and what is allowed.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"randaugment={text!r}: {why}")

    head, *sections = text.split("-")
    if head != "rand":
        raise bad(f"must start with 'rand' (e.g. rand-m9-mstd0.5-inc1), not {head!r}")
    casts: dict[str, Callable[[str], float]] = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}
    values: dict[str, float] = {}
    choice: str | None = None
    for section in sections:
        if not section:
            raise bad("an empty option (two dashes in a row or a dash at the end)")
        if section.startswith("t"):  # timm reads any section starting with "t" as a transform set
            if section[1:] not in _SETS or choice is not None:
                raise bad(f"{'a second transform set' if choice else 'unknown transform set'} {section!r}; "
                          "use one of tweights, t3a, t3aw")  # fmt: skip
            choice = section[1:]
            continue
        key = re.match(r"\D*", section).group()  # type: ignore[union-attr]  # always matches
        if key == "w":
            raise bad(f"option {section!r} was removed in timm 0.9; use tweights for the weighted op choice")
        if key not in casts:
            raise bad(f"unknown option {section!r}; use {_OPTIONS}")
        if key in values:
            raise bad(f"option {key!r} given twice")
        try:
            values[key] = casts[key](section[len(key):])
        except ValueError:
            kind = "an integer" if casts[key] is int else "a number"
            raise bad(f"option {section!r}: {key} takes {kind}, e.g. {key}{'9' if key == 'm' else '1'}") from None
    spec = _spec(values, choice)
    checks = [
        (spec.num_layers >= 1, "n must be >= 1"),
        (0.0 <= spec.prob <= 1.0, "p must be in [0, 1]"),
        (spec.magnitude_max >= 1, "mmax must be >= 1"),
        (values.get("inc", 0) in (0, 1), "inc must be 0 or 1"),
        (spec.weights is None or spec.num_layers <= len(spec.ops),
         f"n must be <= {len(spec.ops)} for a weighted set (ops are drawn without replacement)"),
    ]  # fmt: skip
    for ok, why in checks:
        if not ok:
            raise bad(why)
    return spec


def _spec(values: dict[str, float], choice: str | None) -> RandAugmentSpec:
    ops: tuple[str, ...] = RAND_INCREASING_OPS if values.get("inc") else RAND_OPS
    weights = None
    if choice == "3a":
        ops = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
    elif choice is not None:
        ops = tuple(_WEIGHTED_SETS[choice])
        total = sum(_WEIGHTED_SETS[choice].values())
        weights = tuple(w / total for w in _WEIGHTED_SETS[choice].values())
    mstd = values.get("mstd", 0.0)
    return RandAugmentSpec(magnitude=float(values.get("m", 10.0)), num_layers=int(values.get("n", 2)),
                           prob=values.get("p", 0.5), magnitude_std=math.inf if mstd > 100 else mstd,
                           magnitude_max=float(values.get("mmax", _LEVEL_DENOM)), ops=ops, weights=weights)  # fmt: skip


def fill_colour(mean: Sequence[float]) -> Fill:
    """The uint8 colour that normalises to about 0: round(255 * mean) per channel (an int for 1 channel)."""
    values = tuple(min(255, round(255 * m)) for m in mean)
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------------------------------------------
# The ops: each a small function of (image, parameter, ...); PIL does the pixel work, as in timm and torchvision


def _affine(image: Image.Image, matrix: tuple[float, ...], resample: Image.Resampling, fill: Fill) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


# RandAugment: name -> f(image, level = magnitude / 10, sign, resample, fill); ranges are timm's level functions
_RandOp = Callable[[Image.Image, float, float, Image.Resampling, Fill], Image.Image]


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the top `bits` bits; 0 or fewer keep none, a black image, as Pillow < 13 did. timm asks for 0 bits with
    Posterize at m < 2.5 and PosterizeIncreasing at m 10 (fewer above 12.5); Pillow 13 refuses, so timm fails there."""
    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits >= 1 else Image.new(image.mode, image.size, 0)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


_Enhance = type[ImageEnhance.Color | ImageEnhance.Contrast | ImageEnhance.Brightness | ImageEnhance.Sharpness]
_ENHANCE: dict[str, _Enhance] = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                                 "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}  # fmt: skip


def _enhance(name: str, image: Image.Image, factor: float) -> Image.Image:
    return _ENHANCE[name](image).enhance(factor)


def _rand_enhance(name: str, increasing: bool) -> _RandOp:
    """timm: factor 0.1 + 1.8 level (0.1..1.9); increasing: 1 -+ 0.9 level, at least 0.1."""
    if increasing:
        return lambda im, lv, s, r, f: _enhance(name, im, max(0.1, 1.0 + s * (lv * 0.9)))
    return lambda im, lv, s, r, f: _enhance(name, im, lv * 1.8 + 0.1)


_RAND: dict[str, _RandOp] = {
    "AutoContrast": lambda im, lv, s, r, f: ImageOps.autocontrast(im),
    "Equalize": lambda im, lv, s, r, f: ImageOps.equalize(im),
    "Invert": lambda im, lv, s, r, f: ImageOps.invert(im),
    "Rotate": lambda im, lv, s, r, f: im.rotate(s * (lv * 30.0), resample=r, fillcolor=f),  # +-30 degrees
    "Posterize": lambda im, lv, s, r, f: _posterize(im, int(lv * 4)),  # keep 0..4 bits: stronger at low m
    "PosterizeIncreasing": lambda im, lv, s, r, f: _posterize(im, 4 - int(lv * 4)),  # keep 4..0 bits
    "Solarize": lambda im, lv, s, r, f: ImageOps.solarize(im, min(256, int(lv * 256))),  # threshold 0..256
    "SolarizeIncreasing": lambda im, lv, s, r, f: ImageOps.solarize(im, 256 - min(256, int(lv * 256))),
    "SolarizeAdd": lambda im, lv, s, r, f: _solarize_add(im, min(128, int(lv * 110))),  # add 0..110 below 128
    **{name: _rand_enhance(name, increasing=False) for name in _ENHANCE},
    **{f"{name}Increasing": _rand_enhance(name, increasing=True) for name in _ENHANCE},
    "ShearX": lambda im, lv, s, r, f: _affine(im, (1, s * (lv * 0.3), 0, 0, 1, 0), r, f),  # shear +-0.3
    "ShearY": lambda im, lv, s, r, f: _affine(im, (1, 0, 0, s * (lv * 0.3), 1, 0), r, f),
    "TranslateXRel": lambda im, lv, s, r, f: _affine(im, (1, 0, s * (lv * 0.45) * im.size[0], 0, 1, 0), r, f),
    "TranslateYRel": lambda im, lv, s, r, f: _affine(im, (1, 0, 0, 0, 1, s * (lv * 0.45) * im.size[1]), r, f),
    # 3-Augment: level in [0.5, 1] -> colour factor 1 - level; blur radius 0.1..2.0
    "Desaturate": lambda im, lv, s, r, f: _enhance("Color", im, 1.0 - min(1.0, max(0.5, 0.5 + 0.5 * lv))),
    "GaussianBlur": lambda im, lv, s, r, f: im.filter(ImageFilter.GaussianBlur(min(2.0, max(0.1, 0.1 + 1.9 * lv)))),
}  # fmt: skip
RAND_OP_NAMES = tuple(_RAND)


def rand_op(image: Image.Image, name: str, magnitude: float, *, negate: bool = False,
            resample: Image.Resampling = Image.Resampling.BICUBIC, fill: Fill = 128) -> Image.Image:
    """One RandAugment op at `magnitude` (timm's 0..10 scale, already noised and clipped); `negate` flips the sign
    of the signed ops (Rotate, Shear*, Translate*, *Increasing enhancements), `resample` and `fill` are for the
    geometric ones."""
    return _RAND[name](image, magnitude / _LEVEL_DENOM, -1.0 if negate else 1.0, resample, fill)


def rand_augment(image: Image.Image, spec: RandAugmentSpec, rng: np.random.Generator, fill: Fill) -> Image.Image:
    """RandAugment: `spec.num_layers` ops drawn from `spec.ops`, each applied with probability `spec.prob`."""
    if spec.weights is None:
        chosen = rng.integers(len(spec.ops), size=spec.num_layers)
    else:
        chosen = rng.choice(len(spec.ops), spec.num_layers, replace=False, p=spec.weights)
    for index in chosen.tolist():
        if spec.prob < 1.0 and rng.random() >= spec.prob:
            continue
        magnitude = spec.magnitude
        if math.isinf(spec.magnitude_std):
            magnitude = rng.uniform(0.0, magnitude)
        elif spec.magnitude_std > 0:
            magnitude = rng.normal(magnitude, spec.magnitude_std)
        magnitude = min(max(float(magnitude), 0.0), spec.magnitude_max)
        negate, resample = bool(rng.random() < 0.5), _RANDOM_RESAMPLE[int(rng.integers(2))]
        image = rand_op(image, spec.ops[index], magnitude, negate=negate, resample=resample, fill=fill)
    return image


# TrivialAugment Wide: name -> (31 magnitude bins or None, signed), torchvision's _augmentation_space(31)
TRIVIAL_BINS = 31
_TRIVIAL_SPACE: dict[str, tuple[np.ndarray | None, bool]] = {
    "Identity": (None, False),
    "ShearX": (np.linspace(0.0, 0.99, TRIVIAL_BINS), True),
    "ShearY": (np.linspace(0.0, 0.99, TRIVIAL_BINS), True),
    "TranslateX": (np.linspace(0.0, 32.0, TRIVIAL_BINS), True),  # pixels, whatever the image size
    "TranslateY": (np.linspace(0.0, 32.0, TRIVIAL_BINS), True),
    "Rotate": (np.linspace(0.0, 135.0, TRIVIAL_BINS), True),  # degrees
    **{name: (np.linspace(0.0, 0.99, TRIVIAL_BINS), True) for name in ("Brightness", "Color", "Contrast", "Sharpness")},
    "Posterize": (8 - np.round(np.arange(TRIVIAL_BINS) / ((TRIVIAL_BINS - 1) / 6)), False),  # keep 8..2 bits
    "Solarize": (np.linspace(255.0, 0.0, TRIVIAL_BINS), False),  # threshold
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}  # fmt: skip
TRIVIAL_OPS = tuple(_TRIVIAL_SPACE)


def trivial_op(image: Image.Image, name: str, magnitude_bin: int, *, negate: bool = False,
               resample: Image.Resampling = Image.Resampling.BILINEAR, fill: Fill = 128) -> Image.Image:
    """One TrivialAugment Wide op at magnitude bin `magnitude_bin` (0..30) of torchvision's bins."""
    bins, signed = _TRIVIAL_SPACE[name]
    m = 0.0 if bins is None else float(bins[magnitude_bin])
    m = -m if signed and negate else m
    if name in ("ShearX", "ShearY"):  # torchvision: shear angle atan(m) about the corner = the matrix of timm's
        return _affine(image, (1, m, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, m, 1, 0), resample, fill)
    if name in ("TranslateX", "TranslateY"):  # whole pixels, int(m) as torchvision; +m moves the content right/down
        t = -int(m)
        return _affine(image, (1, 0, t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, t), resample, fill)
    if name == "Rotate":
        return image.rotate(m, resample=resample, fillcolor=fill)
    if name in _ENHANCE:
        return _enhance(name, image, 1.0 + m)
    if name == "Posterize":
        return _posterize(image, int(m))
    if name == "Solarize":  # values >= m invert; m is fractional (246.5, ...): the same as >= ceil(m)
        return ImageOps.solarize(image, math.ceil(m))
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    return ImageOps.equalize(image) if name == "Equalize" else image


def trivial_augment(image: Image.Image, rng: np.random.Generator, fill: Fill) -> Image.Image:
    """TrivialAugment Wide: one op, one magnitude bin, one sign, all uniform."""
    name = TRIVIAL_OPS[int(rng.integers(len(TRIVIAL_OPS)))]
    magnitude_bin, negate = int(rng.integers(TRIVIAL_BINS)), bool(rng.integers(2))
    return trivial_op(image, name, magnitude_bin, negate=negate, fill=fill)


def auto_augment(array: np.ndarray, rng: np.random.Generator, *, randaugment: str | None, trivialaugment: bool,
                 mean: Sequence[float]) -> np.ndarray:
    """RandAugment (`randaugment`, a timm string) or TrivialAugment Wide on a uint8 (H, W, C) array, C 1 or 3;
    `mean` (the model's, in [0, 1]) gives the fill colour. Without either, the array comes back untouched."""
    if randaugment is None and not trivialaugment:
        return array
    channels = array.shape[-1]
    image = Image.fromarray(np.ascontiguousarray(array[..., 0] if channels == 1 else array))
    fill = fill_colour(mean)
    if randaugment is not None:
        image = rand_augment(image, parse_randaugment(randaugment), rng, fill)
    else:
        image = trivial_augment(image, rng, fill)
    out = np.asarray(image)
    return out[:, :, None] if channels == 1 else out
