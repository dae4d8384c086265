"""Position-embedding resampling: load 224 px weights at 384 px (or any other grid), CLS token kept.

Why NumPy and not `jax.image.resize`: the goal is the *same numbers* as timm, which resamples with PyTorch's
`F.interpolate(mode="bicubic", align_corners=False)`, in one of two flavours:
  * antialias=True (timm's `checkpoint_filter_fn` default, also when upsampling): Keys kernel a = -0.5, taps
    clipped to the image and renormalised. `jax.image.resize(..., "bicubic")` happens to agree with this one;
  * antialias=False (plain `upsample_bicubic2d`): Keys kernel a = -0.75 with sample indices clamped to the
    border, which no jax.image method reproduces (differences of ~0.4 on unit-variance grids).
Both are separable, so each is a small (out, in) weight matrix per grid axis; we build them in float64 with
torch's index arithmetic (one code path for both flavours), which matches torch to float32 rounding (~4e-6).
"""

from __future__ import annotations

import math

import numpy as np

from flaxvision.errors import FlaxvisionError

BICUBIC_A_PLAIN = -0.75  # torch upsample_bicubic2d (antialias=False)
BICUBIC_A_ANTIALIAS = -0.5  # torch _upsample_bicubic2d_aa (antialias=True), as PIL


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel, support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _linear(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def interpolation_matrix(in_size: int, out_size: int, mode: str = "bicubic", antialias: bool = True) -> np.ndarray:
    """The (out_size, in_size) float64 matrix of torch's 1-D `F.interpolate(..., align_corners=False)`.

    Args:
      in_size, out_size: number of samples before and after.
      mode: "bicubic" or "bilinear".
      antialias: torch's `antialias` flag (changes the kernel even when upsampling, see the module docstring).
    """
    if mode not in ("bicubic", "bilinear"):
        raise FlaxvisionError(f"position-embedding interpolation must be bicubic or bilinear, got {mode!r}")
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size))
    if antialias:
        kernel = (lambda x: _cubic(x, BICUBIC_A_ANTIALIAS)) if mode == "bicubic" else _linear
        half_width = 2.0 if mode == "bicubic" else 1.0
        support = half_width * scale if scale >= 1.0 else half_width
        inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            # torch truncates toward zero (int64 cast) before clipping to the image.
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            weights = kernel((taps - center + 0.5) * inv_scale)
            total = weights.sum()
            matrix[i, lo:hi] = weights / total if total != 0 else weights
        return matrix
    src = scale * (np.arange(out_size) + 0.5) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps negative source positions for linear modes only
        left = np.floor(src).astype(int)
        frac = src - left
        for i in range(out_size):
            matrix[i, min(left[i], in_size - 1)] += 1 - frac[i]
            matrix[i, min(left[i] + 1, in_size - 1)] += frac[i]
        return matrix
    left = np.floor(src).astype(int)
    frac = src - left
    for i in range(out_size):
        for k in range(-1, 3):  # four taps around the sample, indices clamped to the border
            matrix[i, min(max(left[i] + k, 0), in_size - 1)] += _cubic(np.array(frac[i] - k), BICUBIC_A_PLAIN)
    return matrix


def resample_grid(grid: np.ndarray, new_size: tuple[int, int], mode: str = "bicubic", antialias: bool = True) -> np.ndarray:
    """Resize an (H, W, D) grid to (new_h, new_w, D) like torch's F.interpolate on the NCHW transpose."""
    rows = interpolation_matrix(grid.shape[0], new_size[0], mode, antialias)
    cols = interpolation_matrix(grid.shape[1], new_size[1], mode, antialias)
    out = np.einsum("ih,hwd->iwd", rows, grid.astype(np.float64))
    return np.einsum("jw,iwd->ijd", cols, out)


def resample_pos_embed(
    pos_embed: np.ndarray,
    new_grid: int,
    *,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> np.ndarray:
    """Resample a ViT position embedding (1, prefix + g*g, D) to (1, prefix + new_grid**2, D).

    The defaults reproduce timm's `checkpoint_filter_fn` (bicubic, antialias=True); timm's `.npz` loader uses
    bilinear without antialiasing. The prefix (CLS) positions are kept as they are.

    Args:
      pos_embed: the position embedding of the weights.
      new_grid: patches per side of the target model (img_size // patch_size).
      num_prefix_tokens: leading non-grid tokens (1 for the CLS token).
      mode, antialias: as torch's F.interpolate.

    Example: `resample_pos_embed(pe_224, 24)` gives a (1, 577, D) table for ViT-B/16 at 384 px.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise FlaxvisionError(f"a position embedding has shape (1, tokens, width), got {pos_embed.shape}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[0])
    if old_grid * old_grid != grid.shape[0]:
        raise FlaxvisionError(
            f"position embedding has {grid.shape[0]} grid tokens, not a square grid; flaxvision resamples square grids only"
        )
    if old_grid == new_grid:
        return pos_embed
    grid = grid.reshape(old_grid, old_grid, -1)
    resized = resample_grid(grid, (new_grid, new_grid), mode, antialias).astype(pos_embed.dtype)
    return np.concatenate([prefix, resized.reshape(1, new_grid * new_grid, -1)], axis=1)
