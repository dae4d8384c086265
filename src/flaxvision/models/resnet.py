"""ResNet with BasicBlocks (He et al. 2015) as a Flax NNX module: ResNet-18 and its CIFAR variant.

Two stems:
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
from flaxvision.models.registry import register_family, register_model
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD

STEMS = ("imagenet", "cifar")


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

    def __post_init__(self) -> None:
        check_common(self)
        if self.stem not in STEMS:
            raise ConfigError(f"ResNetConfig: stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
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
    def resnet18_cifar(cls, **kw) -> ResNetConfig:
        return cls(**{"num_classes": 10, "img_size": 32, "stem": "cifar", **kw})

    @property
    def stem_stride(self) -> int:
        return 4 if self.stem == "imagenet" else 2

    @property
    def total_stride(self) -> int:
        return self.stem_stride * 2 ** (len(self.stage_depths) - 1)

    def param_count(self) -> int:
        """Trainable parameters (BatchNorm running statistics excluded), from the config alone."""
        k = 7 if self.stem == "imagenet" else 3
        cin = self.stage_widths[0]
        count = k * k * self.in_chans * cin + 2 * cin
        for stage, (depth, width) in enumerate(zip(self.stage_depths, self.stage_widths, strict=True)):
            for i in range(depth):
                count += 9 * cin * width + 9 * width * width + 4 * width
                if (stage > 0 and i == 0) or cin != width:
                    count += cin * width + 2 * width
                cin = width
        return count + cin * self.num_classes + self.num_classes

    def _convs(self) -> list[tuple[int, int, int]]:
        """(output side, kernel taps x input channels, output channels) of every convolution, in order."""

        def conv_out(size: int, k: int, s: int, p: int) -> int:
            return (size + 2 * p - k) // s + 1

        if self.stem == "imagenet":
            size = conv_out(self.img_size, 7, 2, 3)
            convs = [(size, 49 * self.in_chans, self.stage_widths[0])]
            size = conv_out(size, 3, 2, 1)
        else:
            convs = [(self.img_size, 9 * self.in_chans, self.stage_widths[0])]
            size = self.img_size // 2
        cin = self.stage_widths[0]
        for stage, (depth, width) in enumerate(zip(self.stage_depths, self.stage_widths, strict=True)):
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                out = conv_out(size, 3, stride, 1)
                convs += [(out, 9 * cin, width), (out, 9 * width, width)]
                if stride != 1 or cin != width:
                    convs.append((out, cin, width))
                size, cin = out, width
        return convs

    def forward_flops(self) -> int:
        """2 x multiply-adds of every convolution and the head (BatchNorm, ReLU and pooling not counted)."""
        macs = sum(side * side * taps * cout for side, taps, cout in self._convs())
        return 2 * (macs + self.stage_widths[-1] * self.num_classes)

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
    )  # fmt: skip


def _bn(cfg: ResNetConfig, features: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=cfg.bn_momentum, epsilon=cfg.bn_eps, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    def __init__(self, cfg: ResNetConfig, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(cfg, cout, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(cfg, cout, dtype=dtype, rngs=rngs)
        if stride != 1 or cin != cout:
            self.downsample_conv = _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
            self.downsample_bn = _bn(cfg, cout, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample_conv is None or self.downsample_bn is None else self.downsample_bn(self.downsample_conv(x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNet(Classifier):
    """ResNet with BasicBlocks. `model.train()` / `model.eval()` switch BatchNorm between batch and running stats."""

    family: ClassVar[str] = "resnet"

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config.dtype)
        k, stride = (7, 2) if config.stem == "imagenet" else (3, 1)
        width = config.stage_widths[0]
        self.conv1 = _conv(config.in_chans, width, k, stride, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(config, width, dtype=dtype, rngs=rngs)
        stages, cin = [], width
        for s, (depth, cout) in enumerate(zip(config.stage_depths, config.stage_widths, strict=True)):
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(config, cin, cout, 2 if (s > 0 and i == 0) else 1, dtype=dtype, rngs=rngs))
                cin = cout
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(cin, config.num_classes, dtype=dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled final feature map, (B, 512)."""
        self.check_input(x)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.config.stem == "imagenet":
            # flax's max_pool is unannotated: pyright infers `padding: str` from its default; pairs are documented.
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pyright: ignore[reportArgumentType]
        else:
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x.mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x)).astype(jnp.float32)


register_family(ResNetConfig, ResNet, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # torchvision, the CIFAR-10 tutorial
register_model("resnet18", ResNetConfig.resnet18(), "ResNet-18, 7x7 stem (ImageNet), 224 px")
register_model("resnet18_cifar", ResNetConfig.resnet18_cifar(), "ResNet-18, 3x3 stem (CIFAR), 32 px")
