"""The classic MNIST CNN of the Flax NNX tutorial, for any input size and channel count.

Conv(in -> 32, 3x3) ReLU AvgPool(2) Conv(32 -> 64, 3x3) ReLU AvgPool(2) flatten Dense(-> 256) ReLU Dense(-> classes).
At 28 x 28 x 1 the flattened features are 7 * 7 * 64 = 3136, as in the tutorial.
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


@dataclasses.dataclass(frozen=True, slots=True)
class CNNConfig(ConfigBase):
    num_classes: int = 10
    img_size: int = 28
    in_chans: int = 1
    features: tuple[int, int] = (32, 64)
    hidden: int = 256
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_common(self)
        if self.img_size < 4:
            raise ConfigError(f"CNNConfig: img_size must be >= 4 (two 2x2 poolings), got {self.img_size}")
        if len(self.features) != 2 or min(self.features) < 1 or self.hidden < 1:
            raise ConfigError(f"CNNConfig: features must be two positive widths and hidden >= 1, got {self.features}, {self.hidden}")

    @property
    def pooled_size(self) -> int:
        return self.img_size // 4

    def param_count(self) -> int:
        (c1, c2), h = self.features, self.hidden
        flat = self.pooled_size**2 * c2
        return 9 * self.in_chans * c1 + c1 + 9 * c1 * c2 + c2 + flat * h + h + h * self.num_classes + self.num_classes

    def forward_flops(self) -> int:
        s, (c1, c2) = self.img_size, self.features
        flat = self.pooled_size**2 * c2
        macs = s * s * 9 * self.in_chans * c1 + (s // 2) ** 2 * 9 * c1 * c2 + flat * self.hidden
        return 2 * (macs + self.hidden * self.num_classes)

    def train_memory_bytes(self, batch_size: int, *, optimizer_slots: int = 2) -> int:
        """Device memory of one training step, estimated: within ~2x of XLA's (tests check it).

        The backward pass keeps each convolution's output and its ReLU'd and pooled versions (~3 values per
        convolution output element, as XLA's compiled step shows), and the dense layers' outputs.
        """
        s, (c1, c2) = self.img_size, self.features
        elements = 3 * (s * s * c1 + (s // 2) ** 2 * c2) + 2 * self.hidden + self.num_classes
        itemsize = jnp.dtype(compute_dtype(self.dtype)).itemsize
        inputs = batch_size * s * s * self.in_chans * 4
        return train_step_bytes(self.param_count(), optimizer_slots, batch_size * elements * itemsize + inputs)


class CNN(Classifier):
    family: ClassVar[str] = "cnn"

    def __init__(self, config: CNNConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config.dtype)
        c1, c2 = config.features
        self.conv1 = nnx.Conv(config.in_chans, c1, (3, 3), dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(config.pooled_size**2 * c2, config.hidden, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(config.hidden, config.num_classes, dtype=dtype, rngs=rngs)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last convolution's activations, (B, img_size // 2, img_size // 2, features[1]) (what Grad-CAM reads)."""
        self.check_input(x)
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        return jax.nn.relu(self.conv2(x))

    def _hidden(self, feature_map: jax.Array) -> jax.Array:
        x = nnx.avg_pool(feature_map, window_shape=(2, 2), strides=(2, 2))
        return jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))

    def features(self, x: jax.Array) -> jax.Array:
        return self._hidden(self.feature_map(x))

    def head_from_map(self, feature_map: jax.Array) -> jax.Array:
        """Logits (B, num_classes) in float32 from `feature_map(x)`."""
        return self.head(self._hidden(feature_map)).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head_from_map(self.feature_map(x))


register_family(CNNConfig, CNN, mean=(0.0,), std=(1.0,))  # the MNIST tutorial: pixels / 255
register_model("cnn", CNNConfig(), "The MNIST tutorial CNN: conv32-pool-conv64-pool-dense256, 28 px grayscale")
