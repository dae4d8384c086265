"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") as a Flax NNX module: timm's `convnext_{tiny,small,base}`.

    stem:   4x4 stride-4 convolution (patchify), LayerNorm over channels
    stage:  (from the second on) LayerNorm, 2x2 stride-2 convolution; then `depth` blocks
    block:  x + DropPath(gamma * Linear(GELU(Linear_4x(LN(DepthwiseConv7x7(x))))))
    head:   global average pool, LayerNorm, Linear

Layer scale `gamma` starts at `layer_scale` (1e-6; 0 leaves it out, timm's ls_init_value=None); stochastic depth
grows linearly over all blocks from 0 to `drop_path_rate`, as in the paper and timm. Every LayerNorm but the
head's uses eps 1e-6 (timm and transformers); the head's is `layer_norm_eps` (timm 1e-6, transformers 1e-12).
Inputs are NHWC float images; channels-last throughout, so the LayerNorms and Linears need no transposes.

Parameters: stem_conv, stem_norm; stages[s].downsample_norm / downsample_conv (s > 0); stages[s].blocks[i].conv_dw,
norm, fc1, fc2, gamma; norm; head. Layer-wise lr decay and `--train-only last:K` count blocks (18 for tiny).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError
from flaxvision.models.base import Classifier, ConfigBase, check_common, compute_dtype, train_step_bytes
from flaxvision.models.registry import register_family, register_model
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

NORM_EPS = 1e-6  # every LayerNorm but the head's, in timm and transformers
KERNEL = 7  # depthwise kernel
MLP_RATIO = 4


@dataclasses.dataclass(frozen=True, slots=True)
class ConvNeXtConfig(ConfigBase):
    """Architecture of a ConvNeXt. Presets: `ConvNeXtConfig.tiny()`, `.small()`, `.base()`."""

    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    layer_scale: float = 1e-6  # initial layer-scale value; 0: no layer scale
    layer_norm_eps: float = 1e-6  # the head's LayerNorm
    drop_path_rate: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_common(self)
        kind = "ConvNeXtConfig"
        for name, values, top in (("depths", self.depths, 1024), ("dims", self.dims, 65536)):
            if not isinstance(values, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top for v in values):
                raise ConfigError(f"{kind}: {name} must be a tuple of integers from 1 to {top}, got {values!r}")
        if not 1 <= len(self.depths) <= 8 or len(self.depths) != len(self.dims):
            raise ConfigError(f"{kind}: depths {self.depths} and dims {self.dims} must have equal lengths from 1 to 8 (one per stage)")
        if self.img_size < self.total_stride:
            raise ConfigError(f"{kind}: img_size {self.img_size} is smaller than the total stride {self.total_stride}; use img_size >= {self.total_stride}")
        for name, value, ok in (
            ("drop_path_rate", self.drop_path_rate, lambda v: 0.0 <= v < 1.0),
            ("layer_scale", self.layer_scale, lambda v: 0.0 <= v <= 1e3),
            ("layer_norm_eps", self.layer_norm_eps, lambda v: 0.0 < v <= 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                bounds = {"drop_path_rate": "in [0, 1)", "layer_scale": "in [0, 1000]", "layer_norm_eps": "in (0, 1]"}[name]
                raise ConfigError(f"{kind}: {name} must be a number {bounds}, got {value!r}")

    @classmethod
    def tiny(cls, **kw) -> ConvNeXtConfig:
        return cls(**kw)

    @classmethod
    def small(cls, **kw) -> ConvNeXtConfig:
        return cls(**{"depths": (3, 3, 27, 3), **kw})

    @classmethod
    def base(cls, **kw) -> ConvNeXtConfig:
        return cls(**{"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024), **kw})

    @property
    def total_stride(self) -> int:
        return 4 * 2 ** (len(self.depths) - 1)

    def _sides(self) -> list[int]:
        """Feature-map side of each stage (VALID strided convolutions floor, as PyTorch's)."""
        sides = [self.img_size // 4]
        for _ in self.depths[1:]:
            sides.append(sides[-1] // 2)
        return sides

    def param_count(self) -> int:
        """Trainable parameters, from the config alone (tests check it against the built model and timm)."""
        d0 = self.dims[0]
        count = 16 * self.in_chans * d0 + d0 + 2 * d0
        prev = d0
        for stage, (depth, d) in enumerate(zip(self.depths, self.dims, strict=True)):
            if stage > 0:
                count += 2 * prev + 4 * prev * d + d
            block = KERNEL * KERNEL * d + d + 2 * d + 2 * MLP_RATIO * d * d + MLP_RATIO * d + d
            count += depth * (block + (d if self.layer_scale > 0 else 0))
            prev = d
        return count + 2 * prev + prev * self.num_classes + self.num_classes

    def forward_flops(self) -> int:
        """2 x multiply-adds of the convolutions, the MLPs and the head (norms, GELU and pooling not counted)."""
        sides, d0 = self._sides(), self.dims[0]
        macs = sides[0] ** 2 * 16 * self.in_chans * d0
        prev = d0
        for stage, (depth, d) in enumerate(zip(self.depths, self.dims, strict=True)):
            area = sides[stage] ** 2
            if stage > 0:
                macs += area * 4 * prev * d
            macs += depth * area * (KERNEL * KERNEL * d + 2 * MLP_RATIO * d * d)
            prev = d
        return 2 * (macs + prev * self.num_classes)

    # ---- capabilities (flaxvision.models.base.ModelConfig) ----

    def num_layers(self) -> int:
        """Blocks, all stages together (tiny 18, small and base 36): the unit of layer decay and --train-only."""
        return sum(self.depths)

    def layer_index(self, path: str) -> int:
        """stem 0; block j of stage s -> 1 + blocks before it (a stage's downsampling goes with its first block);
        the final norm and the head num_layers() + 1."""
        parts = path.split(".")
        if parts[0].startswith("stem"):
            return 0
        if parts[0] == "stages":
            stage = int(parts[1])
            before = sum(self.depths[:stage])
            return 1 + before + (int(parts[3]) if parts[2] == "blocks" else 0)
        return self.num_layers() + 1

    def train_memory_bytes(self, batch_size: int, *, optimizer_slots: int = 2) -> int:
        """Device memory of one training step, estimated: within ~2x of XLA's.

        Per block and pixel the backward pass keeps the depthwise output, the LayerNorm output and statistics,
        fc1's and GELU's 4x activations, fc2's and the scaled output: about 21 channels' worth per channel of the
        stage, as XLA's compiled steps of ConvNeXt-T at 64 and 128 px show (1.5x the 14 the list adds up to).
        """
        itemsize = jnp.dtype(compute_dtype(self.dtype)).itemsize
        values = self._sides()[0] ** 2 * self.dims[0] * 3
        for side, depth, d in zip(self._sides(), self.depths, self.dims, strict=True):
            values += side * side * d * (21 * depth + 3)
        inputs = batch_size * self.img_size**2 * self.in_chans * 4
        return train_step_bytes(self.param_count(), optimizer_slots, batch_size * values * itemsize + inputs)


def _norm(features: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance (as PyTorch's LayerNorm) for parity.
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


def _trunc_normal(std: float = 0.02):
    return nnx.initializers.truncated_normal(stddev=std)


class Block(nnx.Module):
    """7x7 depthwise conv, LayerNorm, Linear 4x, GELU, Linear, layer scale, drop path, residual."""

    def __init__(self, cfg: ConvNeXtConfig, dim: int, drop_path_rate: float, *, dtype, rngs: nnx.Rngs):
        pad = KERNEL // 2
        self.conv_dw = nnx.Conv(
            dim, dim, (KERNEL, KERNEL), padding=((pad, pad), (pad, pad)), feature_group_count=dim, dtype=dtype,
            kernel_init=_trunc_normal(), rngs=rngs,
        )  # fmt: skip
        self.norm = _norm(dim, NORM_EPS, dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, MLP_RATIO * dim, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.fc2 = nnx.Linear(MLP_RATIO * dim, dim, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), cfg.layer_scale, jnp.float32)) if cfg.layer_scale > 0 else None
        # Stochastic depth: one Bernoulli per example, broadcast over height, width and channels.
        self.drop_path = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fc2(jax.nn.gelu(self.fc1(self.norm(self.conv_dw(x))), approximate=False))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype).reshape(1, 1, 1, -1)
        return x + self.drop_path(y)


class Stage(nnx.Module):
    def __init__(self, cfg: ConvNeXtConfig, cin: int, dim: int, rates: list[float], *, downsample: bool, dtype, rngs: nnx.Rngs):
        if downsample:
            self.downsample_norm = _norm(cin, NORM_EPS, dtype=dtype, rngs=rngs)
            self.downsample_conv = nnx.Conv(cin, dim, (2, 2), strides=2, padding="VALID", dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        else:
            self.downsample_norm = self.downsample_conv = None
        self.blocks = nnx.List([Block(cfg, dim, rate, dtype=dtype, rngs=rngs) for rate in rates])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample_norm is not None and self.downsample_conv is not None:
            x = self.downsample_conv(self.downsample_norm(x))
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXt(Classifier):
    """ConvNeXt classifier. `ConvNeXt(ConvNeXtConfig.tiny(num_classes=10), rngs=nnx.Rngs(0))(images)`."""

    family: ClassVar[str] = "convnext"

    def __init__(self, config: ConvNeXtConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config.dtype)
        d0 = config.dims[0]
        self.stem_conv = nnx.Conv(config.in_chans, d0, (4, 4), strides=4, padding="VALID", dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.stem_norm = _norm(d0, NORM_EPS, dtype=dtype, rngs=rngs)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, cin, start = [], d0, 0
        for depth, dim in zip(config.depths, config.dims, strict=True):
            stage_rates = rates[start : start + depth]
            stages.append(Stage(config, cin, dim, stage_rates, downsample=start > 0, dtype=dtype, rngs=rngs))
            cin, start = dim, start + depth
        self.stages = nnx.List(stages)
        self.norm = _norm(cin, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(cin, config.num_classes, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Average-pooled, normalised final feature map, (B, dims[-1])."""
        return self.norm(self.feature_map(x).mean(axis=(1, 2)))

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last stage's output before global pooling, (B, h, w, dims[-1]) (what Grad-CAM reads)."""
        self.check_input(x)
        x = self.stem_norm(self.stem_conv(x))
        for stage in self.stages:
            x = stage(x)
        return x

    def head_from_map(self, feature_map: jax.Array) -> jax.Array:
        """Logits (B, num_classes) in float32 from `feature_map(x)`: global average pool, norm, head."""
        return self.head(self.norm(feature_map.mean(axis=(1, 2)))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head_from_map(self.feature_map(x))


# timm's pretrained_cfg of the default tag of each name (convnext_{tiny,small}.in12k_ft_in1k,
# convnext_base.fb_in22k_ft_in1k): what their checkpoints expect, and what a model built from the name uses.
PRETRAINED_PREPROCESSING = {
    name: Preprocessing(img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=crop, resize_mode="shortest", interpolation="bicubic")
    for name, crop in (("convnext_tiny", 0.95), ("convnext_small", 0.95), ("convnext_base", 0.875))
}

register_family(ConvNeXtConfig, ConvNeXt, mean=IMAGENET_MEAN, std=IMAGENET_STD)
for _name, _make, _label in (("convnext_tiny", ConvNeXtConfig.tiny, "T"), ("convnext_small", ConvNeXtConfig.small, "S"),
                             ("convnext_base", ConvNeXtConfig.base, "B")):  # fmt: skip
    register_model(_name, _make(), f"ConvNeXt-{_label}, 224 px", preprocessing=PRETRAINED_PREPROCESSING[_name])
