"""A drop-in for `lax.conv_general_dilated` that computes convolutions with a tiny output as one matmul.

XLA:CPU runs a 3x3 convolution whose output is 2 x 2 pathologically slowly: at batch 64 with 512 channels (the
last stage of ResNet-18 on 32-pixel CIFAR images) it takes ~590 ms against ~20 ms at 4 x 4 and ~12 ms for the same
arithmetic as a matmul (forward; the gradient: ~550 ms against ~18 ms; BENCHMARKS.md). `nnx.Conv` takes the
convolution function as an argument (`conv_general_dilated=`), so the models pass this one: for an output of at
most MAX_OUTPUT_PIXELS pixels it gathers the kernel windows (pad, then one strided slice per kernel tap,
concatenated along the channels) and multiplies them by the kernel reshaped to (kh * kw * C_in, C_out); anything
else goes to `lax.conv_general_dilated` unchanged. The parameters and their layout are nnx.Conv's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

MAX_OUTPUT_PIXELS = 4


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, **kwargs: Any) -> jax.Array:  # fmt: skip
    """`lax.conv_general_dilated` for NHWC inputs and HWIO kernels (nnx.Conv's layout); tiny outputs as a matmul."""
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and rhs.shape[0] * rhs.shape[1] > 1 and not kwargs.get("preferred_element_type"))  # fmt: skip
    if plain:
        kh, kw, cin, cout = rhs.shape
        (top, bottom), (left, right) = ((int(a), int(b)) for a, b in padding)
        sh, sw = window_strides
        oh = (lhs.shape[1] + top + bottom - kh) // sh + 1
        ow = (lhs.shape[2] + left + right - kw) // sw + 1
        if oh * ow <= MAX_OUTPUT_PIXELS:
            x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
            taps = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
            return jnp.concatenate(taps, axis=-1) @ rhs.reshape(kh * kw * cin, cout)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, **kwargs)  # fmt: skip
