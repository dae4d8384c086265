"""1-channel models in transformers' layout: a 3-channel stem that computes what the model computes on gray.

transformers' image-classification pipeline always hands the model RGB (`load_image` converts every image to
RGB, and the image processors keep 3 channels), so a `num_channels: 1` export cannot run there. The choice made
here: a transformers export of a 1-channel model gets a 3-channel stem (patch embedding / first convolution) whose
kernel is the 1-channel kernel times the ITU-R 601-2 luma weights `LUMA` (0.299, 0.587, 0.114), one per input
channel, with the normalisation's mean and std replicated; config.json says `num_channels: 3` and records the
original under `MARKER`. Convolution is linear in its input, so on normalised RGB pixels

    sum_c LUMA[c] * conv(k, (x_c / 255 - mean) / std) = conv(k, (luma(x) / 255 - mean) / std)    (sum LUMA = 1)

which is what the 1-channel model computes on the luma of the image. flaxvision's own decoding (`decode_eval`:
PIL's `convert("L")`, L = R * 299/1000 + G * 587/1000 + B * 114/1000) uses the same weights; the two agree
exactly on gray images (R = G = B) and differ on colour images only by PIL's rounding of L to an integer (at
most 1/2 of a grey level) and by resizing before rather than after the conversion.

The timm and flaxvision layouts keep 1 channel. Reading such an export back (`untile`), flaxvision restores the
1-channel stem exactly (bit for bit) when the kernel is still luma-proportional; one that is not (fine-tuned on
colour images since) loads as the 3-channel model it has become.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from flaxvision.weights.convert import Parsed

logger = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses
MARKER = "flaxvision_grayscale_stem"  # config.json key: {"in_chans": 1, "luma": LUMA}


def marker() -> dict[str, Any]:
    return {"in_chans": 1, "luma": list(LUMA), "note": "3-channel stem = the 1-channel kernel times the luma weights"}


def _weights(ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = 3
    return np.asarray(LUMA, np.float32).reshape(shape)


def _decode(kernel: np.ndarray, axis: int) -> np.ndarray:
    """The 1-channel kernel of a tiled one: the float64 sum of its channels over the sum of the weights, in float32."""
    total = float(_weights(kernel.ndim, axis).astype(np.float64).sum())
    return (kernel.astype(np.float64).sum(axis=axis, keepdims=True) / total).astype(np.float32)


def tile_kernel(kernel: np.ndarray, axis: int) -> np.ndarray:
    """A kernel with 1 input channel on `axis` -> 3 input channels, each the kernel times its luma weight (float32).

    Each product is rounded to float32, and the three rounded products do not always determine the kernel they
    came from; so the blue channel (the smallest weight) is nudged by a few of its ulps (relative changes ~1e-7)
    until `untile_kernel` gives back the kernel bit for bit (hand-written: no library does this round trip).
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.shape[axis] != 1:
        raise ValueError(f"the stem kernel has {kernel.shape[axis]} input channels, not 1")
    tiled = kernel * _weights(kernel.ndim, axis)
    blue = [slice(None)] * kernel.ndim
    blue[axis] = slice(2, 3)
    for _ in range(64):
        decoded = _decode(tiled, axis)
        wrong = decoded != kernel
        if not wrong.any():
            return tiled
        direction = np.where(decoded < kernel, np.float32(np.inf), np.float32(-np.inf))
        tiled[tuple(blue)] = np.where(wrong, np.nextafter(tiled[tuple(blue)], direction), tiled[tuple(blue)])
    raise ValueError("cannot tile the stem kernel exactly (non-finite values?)")


def untile_kernel(kernel: np.ndarray, axis: int) -> np.ndarray | None:
    """The 1-channel kernel `tile_kernel` made `kernel` from, bit for bit; None when `kernel` is not luma-tiled
    (its channels are not the luma weights times one kernel, to float32 rounding: fine-tuned on colour since)."""
    kernel = np.asarray(kernel)
    if kernel.dtype != np.float32 or kernel.shape[axis] != 3 or not np.isfinite(kernel).all():
        return None
    decoded = _decode(kernel, axis)
    if not np.allclose(kernel, decoded * _weights(kernel.ndim, axis), rtol=1e-5, atol=1e-30):
        return None
    return decoded


def rgb_config(config: Any) -> Any:
    return dataclasses.replace(config, in_chans=3)


def tile(params: dict[str, np.ndarray], stem_kernel: str) -> dict[str, np.ndarray]:
    """flaxvision parameters of a 1-channel model with the stem kernel (HWIO, `stem_kernel`) made 3-channel."""
    return {**params, stem_kernel: tile_kernel(params[stem_kernel], axis=2)}


def untile(parsed: Parsed, stem_kernel: str, config_json: dict[str, Any] | None, origin: str) -> Parsed:
    """A transformers export written by `tile` (config.json has `MARKER`) -> the 1-channel model it came from;
    anything else unchanged."""
    if not isinstance((config_json or {}).get(MARKER), dict) or parsed.config.in_chans != 3:
        return parsed
    rule = next((r for r in parsed.rules if r.flax == stem_kernel), None)
    if rule is None or rule.keys[0] not in parsed.tensors:
        return parsed
    key = rule.keys[0]
    kernel = untile_kernel(parsed.tensors[key], axis=1)  # PyTorch's (out, in, kh, kw)
    prep = parsed.preprocessing
    same = prep is None or (len(set(prep.mean)) == 1 and len(set(prep.std)) == 1)
    if kernel is None or not same:
        logger.warning(
            "'%s': config.json says its 3-channel stem was made from a 1-channel model (%s), but the kernel "
            "or the normalisation is no longer luma-tiled; loaded as a 3-channel model",
            origin,
            MARKER,
        )
        return parsed
    gray = None if prep is None else dataclasses.replace(prep, mean=prep.mean[:1], std=prep.std[:1])
    return dataclasses.replace(
        parsed,
        tensors={**parsed.tensors, key: kernel},
        config=dataclasses.replace(parsed.config, in_chans=1),
        preprocessing=gray,
    )
