"""Fine-tune ViT-B/16 on the first 20 Food-101 classes with SGD: the "Train a ViT with JAX" tutorial.

    flaxvision train --preset food101-vit-b16-sgd

google/vit-base-patch16-224 (ImageNet-21k pretrained, ImageNet-1k fine-tuned) with a new zero-initialised 20-class
head; 224 px; RandomResizedCrop(0.7-1.0) + flip + colour jitter 0.2, normalised with mean = std = 0.5; batch 32
(validation 64); 3 epochs of SGD with Nesterov momentum 0.8 and a learning rate of 1e-3 decayed linearly to 0.
The source reports about 95% validation top-1 on the 20 classes (15,000 train / 5,000 validation images).
Needs the Hub (or a cache holding ethz/food101 and the checkpoint); a GPU makes it minutes instead of hours.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "ViT-B/16 from google/vit-base-patch16-224 on 20 Food-101 classes, SGD (the ViT tutorial)"
EXPECTED = "~95% val top-1 (source)"

PRESET = TrainConfig(
    model="vit_base_patch16_224",
    pretrained="google/vit-base-patch16-224",
    dataset="ethz/food101",
    classes="20",
    train_split="train",
    val_split="validation",
    augment="rrc",
    rrc_scale_min=0.7,
    color_jitter=0.2,
    workers=4,
    epochs=3,
    batch_size=32,
    eval_batch_size=64,
    optimizer="sgd",
    lr=1e-3,
    schedule="linear",
    end_lr=0.0,
    momentum=0.8,
    nesterov=True,
    seed=12,
)
