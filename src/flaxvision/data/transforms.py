"""Decode and augment one image on the host: encoded bytes (or an array) in, a uint8 (H, W, C) array out.

This module runs inside grain's worker processes: it uses only PIL and numpy (never jax or datasets).

Cheap paths, in the order they matter:
  * one PIL `resize(..., box=...)` does crop and resize in a single pass (no intermediate crop image);
  * JPEGs are decoded at a reduced size (PIL draft mode, DCT scaling by 1/2, 1/4 or 1/8) whenever the region
    that will be resized still has at least the output size in pixels along both sides;
  * 1-channel models get JPEGs decoded straight to luminance (no colour conversion at all);
  * colour jitter and normalisation are left to the device (see `flaxvision.data.device`).

Every decode failure (unreadable bytes, truncated file, a decompression bomb) raises `BadImage`, which the pipeline
counts and replaces; nothing here stops an epoch.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from flaxvision.data.autoaugment import auto_augment, parse_randaugment
from flaxvision.data.erasing import check_erasing, random_erase
from flaxvision.errors import ConfigError
from flaxvision.preprocessing import Preprocessing

# File name suffixes read as images: by image-folder datasets and by `flaxvision predict` on a directory.
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga".split())

# Pillow's own bomb check: a warning above MAX_IMAGE_PIXELS, an error above twice that. We check the header size
# ourselves against `max_image_pixels` before decoding anything.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (~9459 x 9459)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_CROP_MODES = ("random_resized", "pad_crop", "resize")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadImage(Exception):
    """An image that cannot be used: the message says why (shown in the skipped-images report)."""


@dataclasses.dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Training augmentation. Geometry and flips run on the host; colour jitter runs on the device.

    Attributes:
      crop: "random_resized" (RandomResizedCrop, the ViT recipes), "pad_crop" (resize to the model size, pad by
        `pad` pixels, random crop back: the CIFAR recipe) or "resize" (the eval geometry, no random crop).
      scale: RandomResizedCrop range of the crop's area as a fraction of the image's area.
      ratio: RandomResizedCrop range of the crop's aspect ratio (width / height).
      pad: padding in pixels for "pad_crop".
      hflip: flip horizontally with probability 0.5.
      brightness, contrast, saturation: colour jitter strengths (factors drawn from [1 - s, 1 + s]), applied on the
        device by `device_preprocess`; 0 disables one.
      draft_min_fraction: how many pixels "enough" is for reduced-size JPEG decoding of a random crop: the crop
        may keep as little as this fraction of the output side. 1.0 (default) never lets draft mode cost any
        resolution; e.g. 0.9 also decodes at half size when that leaves the crop 10% short of the output (a mild
        upscale), which saves ~15% of the CPU time on 512-pixel photos at 224.
      randaugment: a timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1"; trivialaugment: TrivialAugment Wide
        (not both). On the host after crop and flip, whatever the crop mode (see `flaxvision.data.autoaugment`).
      reprob, remode, recount: random erasing, last, on the uint8 image: probability, fill ("pixel", "rand",
        "const") and up to how many boxes (see `flaxvision.data.erasing`).
    """

    crop: str = "random_resized"
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    hflip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    draft_min_fraction: float = 1.0
    randaugment: str | None = None
    trivialaugment: bool = False
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1

    def __post_init__(self) -> None:
        if self.crop not in _CROP_MODES:
            raise ConfigError(f"AugmentConfig: crop must be one of {', '.join(_CROP_MODES)}, got {self.crop!r}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ConfigError(f"AugmentConfig: scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"AugmentConfig: ratio must satisfy 0 < low <= high, got {self.ratio}")
        if self.pad < 0:
            raise ConfigError(f"AugmentConfig: pad must be >= 0, got {self.pad}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"AugmentConfig: {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.5 <= self.draft_min_fraction <= 1.0:
            raise ConfigError(f"AugmentConfig: draft_min_fraction must be in [0.5, 1], got {self.draft_min_fraction}")
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)
            if self.trivialaugment:
                raise ConfigError("AugmentConfig: randaugment and trivialaugment exclude each other; choose one")
        check_erasing(self.reprob, self.remode, self.recount)

    @classmethod
    def cifar(cls) -> AugmentConfig:
        """Pad 4, random crop, horizontal flip; no colour jitter (the CIFAR-10 ResNet-18 recipe)."""
        return cls(crop="pad_crop", brightness=0.0, contrast=0.0, saturation=0.0)

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all: training images get the eval geometry."""
        return cls(crop="resize", hflip=False, brightness=0.0, contrast=0.0, saturation=0.0)


# --------------------------------------------------------------------------------------------------------------
# Opening and mode conversion


def open_image(data: Any, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A lazily decoded PIL image from encoded bytes, a file path or an array; checks the size in the header.

    Raises:
      BadImage: empty or undecodable data, or more than `max_image_pixels` pixels.
    """
    if isinstance(data, np.ndarray):
        return _image_from_array(data)
    if isinstance(data, (str, os.PathLike)):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadImage(f"cannot read file: {err}") from None
    if not data:
        raise BadImage("empty (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadImage(f"decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many types for garbage (UnidentifiedImageError, SyntaxError, ...)
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"empty image ({width} x {height})")
    if width * height > max_image_pixels:
        raise BadImage(f"too large: {width} x {height} pixels is above the limit of {max_image_pixels}")
    return image


def _image_from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise BadImage(f"array of shape {array.shape} is not an image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if array.dtype != np.uint8:
        array = _to_uint8(array)
    return Image.fromarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel values to uint8: 16-bit by 1/257, floats in [0, 1] by 255."""
    if array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255):
        return (array.astype(np.uint32) // 257).clip(0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        peak = float(np.nanmax(array)) if array.size else 0.0
        array = np.nan_to_num(array) * (255.0 if peak <= 1.0 else 1.0)
        return np.rint(array).clip(0, 255).astype(np.uint8)
    return array.clip(0, 255).astype(np.uint8)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (channels=3) or L (channels=1), correctly.

    Transparent images are composited onto white (what viewers show); palette images go through their palette;
    CMYK uses Pillow's conversion (Adobe-inverted CMYK JPEGs are already un-inverted by the decoder); 16-bit and
    32-bit integer images are scaled, not clipped (Pillow's own `convert("L")` clips 16-bit values to 255).
    """
    target = "RGB" if channels == 3 else "L"
    mode = image.mode
    if mode == target:
        return image
    if mode.startswith("I") or mode == "F":
        gray = Image.fromarray(_to_uint8(np.asarray(image)))
        return gray if target == "L" else gray.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert(target)
    return image.convert(target)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not worth skipping an image for
        return 1


def _load(image: Image.Image, orientation: int) -> Image.Image:
    try:
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise BadImage(f"decompression bomb: {err}") from None
    except Exception as err:  # truncated data raises OSError; corrupt streams raise assorted errors
        raise BadImage(f"cannot decode ({type(err).__name__}: {err})") from None
    return image


# --------------------------------------------------------------------------------------------------------------
# Geometry: every path ends in one resize(size, box=region) call


def random_resized_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """A RandomResizedCrop region (left, top, right, bottom) of a width x height image (torchvision's sampler).

    Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; then the whole image,
    clamped to the ratio range, as torchvision does.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def eval_box(width: int, height: int, preprocessing: Preprocessing) -> tuple[float, float, float, float]:
    """The region that eval preprocessing maps onto the img_size x img_size output.

    "squash" resizes both sides to img_size / crop_pct and takes the centre img_size x img_size: the central
    crop_pct of each side. "shortest" scales the shorter side to img_size / crop_pct (keeping the aspect ratio) and
    takes the centre: a centred square of crop_pct x the shorter side.
    """
    if preprocessing.resize_mode == "squash":
        w, h = width * preprocessing.crop_pct, height * preprocessing.crop_pct
    else:
        w = h = min(width, height) * preprocessing.crop_pct
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def _draft(
    image: Image.Image, box: tuple[float, float, float, float], out_size: tuple[float, float], channels: int
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Start a reduced-size JPEG decode when `box` keeps >= out_size pixels; return the image and the scaled box.

    `box` is in display (EXIF-rotated) coordinates; the reduction is the same along both axes, so it maps
    unchanged onto the stored orientation.
    """
    if image.format != "JPEG":
        return image, box
    factor = min((box[2] - box[0]) / out_size[0], (box[3] - box[1]) / out_size[1])
    luminance_only = channels == 1 and image.mode == "RGB"  # decode Y only, skip the colour conversion
    if factor < 2 and not luminance_only:
        return image, box
    width, height = image.size
    reduce = max(factor, 1.0)
    drafted = image.draft("L" if luminance_only else image.mode, (math.ceil(width / reduce), math.ceil(height / reduce)))
    if drafted is None:
        return image, box
    scale = drafted[1][2] / width  # 1, 1/2, 1/4 or 1/8
    return image, (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)


def _display_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)


def decode_eval(data: Any, preprocessing: Preprocessing, *, draft: bool = True,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Eval preprocessing of one image for a model with this `preprocessing`: uint8 (img_size, img_size, channels).

    Resizes (+ centre crop) by the preprocessing's resize_mode, crop_pct and interpolation; normalisation is left
    to the device.

    Args:
      data: encoded bytes, a file path or an array.
      preprocessing: the model's `Preprocessing` (img_size, channels = len(mean), crop_pct, resize_mode,
        interpolation).
      draft: decode JPEGs at a reduced size when the region still has at least the output size in pixels.
      max_image_pixels: images with more pixels (by their header) raise `BadImage` (decompression bombs).

    Raises:
      BadImage: the image is unusable.

    Example: `decode_eval("cat.jpg", model.preprocessing)`.
    """
    image = open_image(data, max_image_pixels)
    orientation = _orientation(image)
    box = eval_box(*_display_size(image, orientation), preprocessing)
    size, channels = preprocessing.img_size, preprocessing.channels
    if draft:
        image, box = _draft(image, box, (size, size), channels)
    image = to_mode(_load(image, orientation), channels)
    return _as_array(image.resize((size, size), _RESAMPLE[preprocessing.interpolation], box=box), channels)


def decode_train(data: Any, preprocessing: Preprocessing, augment: AugmentConfig, rng: np.random.Generator, *,
                 draft: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Training preprocessing of one image: random geometry and flip, then RandAugment or TrivialAugment, then
    random erasing, per `augment`, all drawn from `rng`; uint8 (img_size, img_size, channels). `draft` and
    `max_image_pixels` as in `decode_eval`."""
    if augment.crop == "resize":
        array = decode_eval(data, preprocessing, draft=draft, max_image_pixels=max_image_pixels)
    elif augment.crop == "pad_crop":
        whole = dataclasses.replace(preprocessing, crop_pct=1.0, resize_mode="squash")
        array = _pad_crop(decode_eval(data, whole, draft=draft, max_image_pixels=max_image_pixels), augment.pad, rng)
    else:
        image = open_image(data, max_image_pixels)
        orientation = _orientation(image)
        box = random_resized_box(*_display_size(image, orientation), augment.scale, augment.ratio, rng)
        size, channels = preprocessing.img_size, preprocessing.channels
        if draft:
            enough = size * augment.draft_min_fraction
            image, box = _draft(image, box, (enough, enough), channels)
        image = to_mode(_load(image, orientation), channels)
        array = _as_array(image.resize((size, size), _RESAMPLE[preprocessing.interpolation], box=box), channels)
    if augment.hflip and rng.random() < 0.5:
        array = array[:, ::-1]
    array = auto_augment(array, rng, randaugment=augment.randaugment, trivialaugment=augment.trivialaugment,
                         mean=preprocessing.mean)  # fmt: skip
    if augment.reprob > 0:
        array = random_erase(array, rng, prob=augment.reprob, mode=augment.remode, max_count=augment.recount,
                             mean=preprocessing.mean, std=preprocessing.std)  # fmt: skip
    return array


def _pad_crop(array: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    if pad == 0:
        return array
    size = array.shape[0]
    padded = np.pad(array, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top:top + size, left:left + size]


def _as_array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image)
    return array[:, :, None] if channels == 1 else array


def probe_image(data: Any, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """Decode one image fully and return its channel count: 1 for grayscale (L, 1, I;16, I, F), else 3.

    Raises:
      BadImage: the image is unusable.
    """
    image = open_image(data, max_image_pixels)
    image = _load(image, _orientation(image))
    return 1 if image.mode in ("1", "L", "LA", "La", "F") or image.mode.startswith("I") else 3
