"""The DeiT recipe from scratch on small images: the default run's ViT on 360 of scikit-learn's digits.

    flaxvision train --preset digits-vit-deit

DeiT (Touvron et al. 2021) trains ViTs on ImageNet from scratch with strong regularisation: AdamW (weight decay
0.05), cosine decay after warmup, label smoothing 0.1, mixup 0.8 and CutMix 1.0 (one of them per batch, switch
probability 0.5), RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25, stochastic depth 0.1 and an EMA of the
weights; the paper reports 72.2% ImageNet top-1 for DeiT-Ti after 300 epochs. Here the same recipe trains the
default run's 4-block ViT (width 128, 4 x 4 patches of 16 px images) on 36 images per class of the offline digits
(360 in all; the usual stratified 20% of the 1,797 is held out), 150 epochs at lr 5e-4. For CIFAR-sized data:
`--dataset uoft-cs/cifar10 --val-split test --img-size 32 --max-train-samples none --color-jitter 0`.

Measured here (2026-12-02, 2 CPU cores, AMD EPYC with AVX-512, seed 0, val top-1 at the end (best epoch); "plain"
is the same run without label smoothing, mixup/CutMix, RandAugment, erasing, drop-path and EMA):

    flaxvision train --preset digits-vit-deit                                      # 93.0% (93.9%), EMA 92.4%
    flaxvision train --preset digits-vit-deit --label-smoothing 0 --mixup 0 --cutmix 0 --randaugment none \
      --reprob 0 --ema-decay none --no-ema-warmup --model-overrides '{"patch_size": 4, "width": 128,
      "depth": 4, "num_heads": 4, "mlp_dim": 256}'                                 # plain: 95.8% (96.4%)

So on these 16 px digits the DeiT recipe does NOT beat the plain run (nor at lr 1e-3: 89.1%, or 2e-3: 59.6% against
95.5% plain; without RandAugment 93.6%; RandAugment m5 with one op 89.1%; on all 1,437 training digits for 60
epochs at 2e-3 it never leaves chance, 15.9%, against 98.3%). The images are 8 x 8 pixels upscaled: RandAugment
m9's translations (up to 40% of the side), rotations and CutMix's pasted boxes erase most of a digit, and 150
epochs of 11 steps are far from DeiT's 300 epochs of ImageNet. The recipe is the paper's; what it buys needs data
and epochs of ImageNet or CIFAR scale, which this offline, 2-core machine does not have.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "DeiT recipe (mixup/CutMix, RandAugment, erasing, drop-path, EMA) from scratch on 360 digits (offline)"
EXPECTED = "93.0% val top-1 here, below the plain run's 95.8% (see the docstring)"

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
    lr=5e-4,
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
