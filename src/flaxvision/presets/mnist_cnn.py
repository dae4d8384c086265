"""The Flax NNX MNIST tutorial's CNN on MNIST.

    flaxvision train --preset mnist-cnn

conv32-avgpool-conv64-avgpool-dense256-dense10 on 28 x 28 grayscale digits, pixels / 255, no augmentation;
batch 32, 10 epochs of AdamW at 0.005 with b1 0.9 (optax's default weight decay 1e-4), evaluated on the test split.
The source reports about 99% test accuracy.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "The MNIST tutorial CNN on ylecun/mnist, AdamW"
EXPECTED = "~99% test accuracy (source)"

PRESET = TrainConfig(
    model="cnn",
    dataset="ylecun/mnist",
    val_split="test",
    augment="none",
    epochs=10,
    batch_size=32,
    eval_batch_size=256,
    optimizer="adamw",
    lr=0.005,
    b1=0.9,
    weight_decay=1e-4,
    schedule="constant",
)
