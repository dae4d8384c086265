"""The DeiT recipe from scratch on small images: the default run's ViT on 360 of scikit-learn's digits.

    flaxvision train --preset digits-vit-deit

DeiT (Touvron et al. 2021) trains ViTs on ImageNet from scratch with strong regularisation: AdamW (weight decay
0.05), cosine decay after warmup, label smoothing 0.1, mixup 0.8 and CutMix 1.0 (one of them per batch, switch
probability 0.5), RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25, stochastic depth 0.1 and an EMA of the
weights; the paper reports 72.2% ImageNet top-1 for DeiT-Ti after 300 epochs. Here the same recipe trains the
default run's 4-block ViT (width 128, 4 x 4 patches of 16 px images) on 36 images per class of the offline digits
(360 in all; the usual stratified 20% of the 1,797 is held out), the regime where a ViT from scratch overfits.

MEASURED
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "DeiT recipe (mixup/CutMix, RandAugment, erasing, drop-path, EMA) from scratch on 360 digits (offline)"
EXPECTED = "MEASURED"

PRESET = TrainConfig(
    model="vit_tiny_patch16_224",
    model_overrides={"patch_size": 4, "width": 128, "depth": 4, "num_heads": 4, "mlp_dim": 256, "drop_path_rate": 0.1},
    img_size=16,
    dataset="builtin:digits",
    val_fraction=0.2,
    max_train_samples=360,
    augment="rrc",
    rrc_scale_min=0.85,
    hflip=False,
    color_jitter=0.0,
    epochs=150,
    batch_size=32,
    eval_batch_size=128,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.05,
    warmup_steps=55,
    schedule="cosine",
    label_smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    randaugment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    ema_decay=0.998,
    ema_warmup=True,
)
