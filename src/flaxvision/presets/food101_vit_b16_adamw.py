"""Fine-tune ViT-B/16 on the first 20 Food-101 classes with AdamW: the "Fine-tuning ViT on Food 101" write-up.

    flaxvision train --preset food101-vit-b16-adamw

Same data and model as food101-vit-b16-sgd; batch 64 (validation 128), 10 epochs of AdamW at 3e-5 with weight
decay 0.05 (not on biases, norms, position embeddings or the CLS token), 500 warmup steps then cosine decay;
random flips and colour jitter. The source reports 92.79% best validation top-1 (epoch 10; train 99.79%),
101 s per epoch on a TPU v5 lite with 8 chips.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "ViT-B/16 from google/vit-base-patch16-224 on 20 Food-101 classes, AdamW + warmup (the pipeline write-up)"
EXPECTED = "92.79% best val top-1 (source)"

PRESET = TrainConfig(
    model="vit_base_patch16_224",
    pretrained="google/vit-base-patch16-224",
    dataset="ethz/food101",
    classes="20",
    augment="rrc",
    workers=4,
    epochs=10,
    batch_size=64,
    eval_batch_size=128,
    optimizer="adamw",
    lr=3e-5,
    weight_decay=0.05,
    warmup_steps=500,
    schedule="cosine",
)
