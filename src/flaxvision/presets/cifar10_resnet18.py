"""ResNet-18 (3x3 stem) on CIFAR-10: the "JAX for PyTorch users" tutorial.

    flaxvision train --preset cifar10-resnet18

Pad-4 random crop + horizontal flip, normalised with the ImageNet mean/std; batch 512, 3 epochs of AdamW at 0.005
with b1 0.9; BatchNorm in train mode while training and eval mode for evaluation. The source reports per-epoch
losses and accuracies but no final figure; expect roughly 70-80% test accuracy after 3 epochs.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "ResNet-18 (CIFAR stem) on uoft-cs/cifar10, AdamW (the JAX-for-PyTorch-users tutorial)"
EXPECTED = "no figure in the source"

PRESET = TrainConfig(
    model="resnet18_cifar",
    dataset="uoft-cs/cifar10",
    val_split="test",
    augment="cifar",
    workers=4,
    epochs=3,
    batch_size=512,
    eval_batch_size=512,
    optimizer="adamw",
    lr=0.005,
    b1=0.9,
    weight_decay=1e-4,
    schedule="constant",
)
