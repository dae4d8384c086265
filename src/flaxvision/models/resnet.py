"""ResNet (He et al. 2015) as a Flax NNX module: ResNet-18/34 (basic blocks), ResNet-50 (bottlenecks), CIFAR ResNet-18.

Blocks:
    "basic":      3x3 conv (stride), 3x3 conv; a stage's width is its output width (ResNet-18/34);
    "bottleneck": 1x1 conv, 3x3 conv (stride: torchvision's and timm's "ResNet v1.5"), 1x1 conv to 4x the width;
                  a stage's width is the bottleneck's, its output 4x that (ResNet-50: 64 -> 256 ... 512 -> 2048).
A 1x1 conv + BatchNorm shortcut wherever the stride or the width changes. Two stems:
    "imagenet": 7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max pool (torchvision/timm resnet18, 224 px);
    "cifar":    3x3 stride-1 conv, BatchNorm, ReLU, 2x2 max pool (the "JAX for PyTorch users" ResNet-18, 32 px).
Convolutions use PyTorch's symmetric padding (not 'SAME', which pads stride-2 convolutions asymmetrically), so
torchvision/timm weights map one to one. BatchNorm momentum 0.9 / eps 1e-5 are PyTorch's 0.1 / 1e-5.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError
from flaxvision.models.base import Classifier, ConfigBase, check_common, compute_dtype, train_step_bytes
from flaxvision.models.conv import conv_general_dilated
from flaxvision.models.registry import register_family, register_model
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

STEMS = ("imagenet", "cifar")
BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclasses.dataclass(frozen=True, slots=True)
class ResNetConfig(ConfigBase):
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    stage_depths: tuple[int, ...] = (2, 2, 2, 2)
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = "imagenet"
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: str = "float32"
    block: str = "basic"
    stem_width: int | None = None  # channels of the stem convolution; None: stage_widths[0] (timm: always 64)

    def __post_init__(self) -> None:
        check_common(self)
        if self.stem not in STEMS:
            raise ConfigError(f"ResNetConfig: stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        if self.block not in BLOCKS:
            raise ConfigError(f"ResNetConfig: block must be one of {', '.join(BLOCKS)}, got {self.block!r}")
        widths = (*self.stage_widths, *(() if self.stem_width is None else (self.stem_width,)))
        if not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 65536 for w in widths):
            raise ConfigError(
                f"ResNetConfig: stage_widths {self.stage_widths} and stem_width {self.stem_width!r} must be integers "
                "from 1 to 65536"
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d <= 1024 for d in self.stage_depths):
            raise ConfigError(f"ResNetConfig: stage_depths {self.stage_depths} must be integers from 1 to 1024")
        if len(self.stage_depths) != len(self.stage_widths) or not self.stage_depths or min(self.stage_depths) < 1:
            raise ConfigError(
                f"ResNetConfig: stage_depths {self.stage_depths} and stage_widths {self.stage_widths} must be "
                "non-empty, of equal length, with every depth >= 1"
            )
        if self.img_size < self.total_stride:
            raise ConfigError(
                f"ResNetConfig: img_size {self.img_size} is smaller than the network's total stride "
                f"{self.total_stride}; use img_size >= {self.total_stride}"
            )
        if not 0.0 < self.bn_momentum < 1.0:
            raise ConfigError(f"ResNetConfig: bn_momentum must be in (0, 1), got {self.bn_momentum!r}")

    @classmethod
    def resnet18(cls, **kw) -> ResNetConfig:
        return cls(**kw)

    @classmethod
    def resnet34(cls, **kw) -> ResNetConfig:
        return cls(**{"stage_depths": (3, 4, 6, 3), **kw})

    @classmethod
    def resnet50(cls, **kw) -> ResNetConfig:
        return cls(**{"stage_depths": (3, 4, 6, 3), "block": "bottleneck", **kw})

    @classmethod
    def resnet18_cifar(cls, **kw) -> ResNetConfig:
        return cls(**{"num_classes": 10, "img_size": 32, "stem": "cifar", **kw})

    @property
    def stem_channels(self) -> int:
        return self.stage_widths[0] if self.stem_width is None else self.stem_width

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    @property
    def num_features(self) -> int:
        """Channels of the pooled features the head sees (512 for ResNet-18, 2048 for ResNet-50)."""
        return self.stage_widths[-1] * self.expansion

    @property
    def stem_stride(self) -> int:
        return 4 if self.stem == "imagenet" else 2

    @property
    def total_stride(self) -> int:
        return self.stem_stride * 2 ** (len(self.stage_depths) - 1)

    def param_count(self) -> int:
        """Trainable parameters (BatchNorm running statistics excluded), from the config alone."""
        # Every convolution is bias-free and followed by a BatchNorm (a scale and a bias per output channel).
        convs = sum(taps * cout + 2 * cout for _, taps, cout in self._convs())
        return convs + self.num_features * self.num_classes + self.num_classes

    def _convs(self) -> list[tuple[int, int, int]]:
        """(output side, kernel taps x input channels, output channels) of every convolution, in order."""

        def conv_out(size: int, k: int, s: int, p: int) -> int:
            return (size + 2 * p - k) // s + 1

        stem = self.stem_channels
        if self.stem == "imagenet":
            size = conv_out(self.img_size, 7, 2, 3)
            convs = [(size, 49 * self.in_chans, stem)]
            size = conv_out(size, 3, 2, 1)
        else:
            convs = [(self.img_size, 9 * self.in_chans, stem)]
            size = self.img_size // 2
        cin = stem
        for stage, (depth, width) in enumerate(zip(self.stage_depths, self.stage_widths, strict=True)):
            cout = width * self.expansion
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                out = conv_out(size, 3, stride, 1)
                if self.block == "basic":
                    convs += [(out, 9 * cin, width), (out, 9 * width, width)]
                else:
                    convs += [(size, cin, width), (out, 9 * width, width), (out, width, cout)]
                if stride != 1 or cin != cout:
                    convs.append((out, cin, cout))
                size, cin = out, cout
        return convs

    def forward_flops(self) -> int:
        """2 x multiply-adds of every convolution and the head (BatchNorm, ReLU and pooling not counted)."""
        macs = sum(side * side * taps * cout for side, taps, cout in self._convs())
        return 2 * (macs + self.num_features * self.num_classes)

    def train_memory_bytes(self, batch_size: int, *, optimizer_slots: int = 2) -> int:
        """Device memory of one training step, estimated: within ~2x of XLA's (tests check it).

        The backward pass keeps each convolution's output, its BatchNorm'd and ReLU'd versions and BatchNorm's
        statistics: about 7 values per output element, as XLA's compiled steps of ResNet-18 at 32 and 96 px show.
        """
        elements = sum(side * side * cout for side, _, cout in self._convs())
        itemsize = jnp.dtype(compute_dtype(self.dtype)).itemsize
        inputs = batch_size * self.img_size**2 * self.in_chans * 4
        return train_step_bytes(self.param_count(), optimizer_slots, 7 * batch_size * elements * itemsize + inputs)


def _conv(cin: int, cout: int, k: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    pad = k // 2
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), rngs=rngs,
        conv_general_dilated=conv_general_dilated,  # tiny outputs (the last stage at 32 px) as a matmul
    )  # fmt: skip


def _bn(cfg: ResNetConfig, features: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=cfg.bn_momentum, epsilon=cfg.bn_eps, dtype=dtype, rngs=rngs)


class Block(nnx.Module):
    """A basic block (conv1, conv2) or a bottleneck (conv1 1x1, conv2 3x3 with the stride, conv3 1x1 to 4x)."""

    def __init__(self, cfg: ResNetConfig, cin: int, width: int, stride: int, *, dtype, rngs: nnx.Rngs):
        cout = width * cfg.expansion
        if cfg.block == "basic":
            self.conv1 = _conv(cin, width, 3, stride, dtype=dtype, rngs=rngs)
        else:
            self.conv1 = _conv(cin, width, 1, 1, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(cfg, width, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, 3, 1 if cfg.block == "basic" else stride, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(cfg, width, dtype=dtype, rngs=rngs)
        if cfg.block == "bottleneck":
            self.conv3 = _conv(width, cout, 1, 1, dtype=dtype, rngs=rngs)
            self.bn3 = _bn(cfg, cout, dtype=dtype, rngs=rngs)
        else:
            self.conv3 = self.bn3 = None
        if stride != 1 or cin != cout:
            self.downsample_conv = _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
            self.downsample_bn = _bn(cfg, cout, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample_conv is None or self.downsample_bn is None else self.downsample_bn(self.downsample_conv(x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None and self.bn3 is not None:
            y = self.bn3(self.conv3(jax.nn.relu(y)))
        return jax.nn.relu(y + shortcut)


BasicBlock = Block  # the name of the basic-block-only ResNet of earlier versions


class ResNet(Classifier):
    """ResNet. `model.train()` / `model.eval()` switch BatchNorm between batch and running stats.

    Parameters: conv1, bn1 (stem); stages[s][i].conv1/bn1, conv2/bn2, (conv3/bn3), downsample_conv/downsample_bn; head.
    """

    family: ClassVar[str] = "resnet"

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config.dtype)
        k, stride = (7, 2) if config.stem == "imagenet" else (3, 1)
        width = config.stem_channels
        self.conv1 = _conv(config.in_chans, width, k, stride, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(config, width, dtype=dtype, rngs=rngs)
        stages, cin = [], width
        for s, (depth, planes) in enumerate(zip(config.stage_depths, config.stage_widths, strict=True)):
            blocks = []
            for i in range(depth):
                blocks.append(Block(config, cin, planes, 2 if (s > 0 and i == 0) else 1, dtype=dtype, rngs=rngs))
                cin = planes * config.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, config.num_classes, dtype=dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled final feature map, (B, num_features): 512 for ResNet-18/34, 2048 for ResNet-50."""
        return self.feature_map(x).mean(axis=(1, 2))

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last stage's output before global pooling, (B, h, w, num_features) (what Grad-CAM reads)."""
        self.check_input(x)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.config.stem == "imagenet":
            # 3x3/2 max pool with one pixel of padding, written as an explicit -inf pad and a VALID pool (the same
            # values and gradients as padding=((1, 1), (1, 1))): jax2onnx's nnx.max_pool takes only "SAME"/"VALID"
            # padding, and SAME pads (0, 1) on even sizes, not (1, 1). Keywords: its max_pool takes no positionals.
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
            x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2))
        else:
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x

    def head_from_map(self, feature_map: jax.Array) -> jax.Array:
        """Logits (B, num_classes) in float32 from `feature_map(x)`: global average pool, head."""
        return self.head(feature_map.mean(axis=(1, 2))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head_from_map(self.feature_map(x))


# timm's pretrained_cfg of the default tag of each ImageNet name (resnet{18,34,50}.a1_in1k): what their checkpoints
# expect, and what a model built from the name uses (the registry's ModelSpec.preprocessing).
PRETRAINED_PREPROCESSING = {
    name: Preprocessing(img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.95, resize_mode="shortest", interpolation="bicubic")
    for name in ("resnet18", "resnet34", "resnet50")
}

register_family(ResNetConfig, ResNet, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # torchvision, the CIFAR-10 tutorial
_PREP = PRETRAINED_PREPROCESSING
register_model("resnet18", ResNetConfig.resnet18(), "ResNet-18, 7x7 stem (ImageNet), 224 px", preprocessing=_PREP["resnet18"])
register_model("resnet34", ResNetConfig.resnet34(), "ResNet-34, basic blocks, 224 px", preprocessing=_PREP["resnet34"])
register_model("resnet50", ResNetConfig.resnet50(), "ResNet-50, bottleneck blocks, 224 px", preprocessing=_PREP["resnet50"])
register_model("resnet18_cifar", ResNetConfig.resnet18_cifar(), "ResNet-18, 3x3 stem (CIFAR), 32 px")
