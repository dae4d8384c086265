"""LoRA fine-tune of ViT-B/16 on Food-101: the setting of Hugging Face PEFT's image-classification LoRA guide.

    flaxvision train --preset food101-vit-b16-lora

LoRA of rank 16 (alpha 16, dropout 0.1) on the attention's query and value projections (the `q` and `v` columns
of flaxvision's fused qkv), the classifier trained in full ("modules to save"), every other weight frozen: about
0.8% of ViT-B/16's parameters train. As in the guide: AdamW at 5e-3 with no weight decay, linear decay, batch 512
(micro-batches of 128, `accumulate_steps` 4), 5 epochs, RandomResizedCrop + flip (the guide's crop scale starts
at 0.08; flaxvision's lowest is 0.1). The guide starts from `google/vit-base-patch16-224-in21k` and keeps the first
5,000 Food-101 training images (10% held out); this preset starts from the tutorials' `google/vit-base-patch16-224`
and uses 4,500 training images with 500 of the validation split. The guide's trained model reports 96% accuracy
on its held-out images (5 epochs).

At the end, model/ holds the merged model (for predict, evaluate, export) and adapter/ the adapter alone.
"""

from flaxvision.train.config import TrainConfig

DESCRIPTION = "ViT-B/16 + LoRA r16 on query/value and the head, all 101 Food-101 classes (HF PEFT's guide)"
EXPECTED = "~96% held-out accuracy (the guide's trained model, 5 epochs)"

PRESET = TrainConfig(
    model="vit_base_patch16_224",
    pretrained="google/vit-base-patch16-224",
    dataset="ethz/food101",
    max_train_samples=4500,
    max_val_samples=500,
    augment="rrc",
    rrc_scale_min=0.1,
    color_jitter=0.0,
    workers=4,
    epochs=5,
    batch_size=512,
    accumulate_steps=4,
    eval_batch_size=128,
    optimizer="adamw",
    lr=5e-3,
    weight_decay=0.0,
    schedule="linear",
    lora_rank=16,
    lora_alpha=16.0,
    lora_targets="q,v",
    lora_dropout=0.1,
)
