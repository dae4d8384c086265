"""The built-in offline default: a small ViT trained from scratch on scikit-learn's handwritten digits.

    flaxvision train

1,797 8 x 8 grayscale digits (the UCI optical-recognition set that scikit-learn ships), upscaled to 16 x 16,
10 classes; a stratified 20% held out for validation. A 4-block ViT (width 128, 4 heads, 4 x 4 patches: 16 tokens
and the CLS token) from scratch, AdamW with warmup, cosine decay and label smoothing, light augmentation (random
resized crop 0.85-1.0, no flip: digits are not mirror-symmetric). No network needed.
Expected: >= 95% validation top-1 in under 3 minutes on 2 CPU cores.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "Small ViT from scratch on scikit-learn's digits (offline, CPU, minutes)"
EXPECTED = ">= 95% val top-1 in < 3 min on 2 CPU cores"

PRESET = TrainConfig(
    model="vit_tiny_patch16_224",
    model_overrides={"patch_size": 4, "width": 128, "depth": 4, "num_heads": 4, "mlp_dim": 256},
    img_size=16,
    dataset="builtin:digits",
    val_fraction=0.2,
    augment="rrc",
    rrc_scale_min=0.85,
    hflip=False,
    color_jitter=0.0,
    epochs=20,
    batch_size=64,
    eval_batch_size=128,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.05,
    warmup_steps=50,
    schedule="cosine",
    label_smoothing=0.1,
)
