"""Small learnable data and models shared by the trainer tests (and run as a script by the kill/resume test)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import flaxvision

TINY_VIT = dict(img_size=16, patch_size=4, width=32, num_heads=2, mlp_dim=64, depth=2)


def colour_data(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class is their dominant colour (red, green, blue, grey) under noise: learnable fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 90, (n, size, size, 3))
    for i, c in enumerate(labels):
        if c < 3:
            images[i, :, :, c] += 120
        else:
            images[i] += 60
    return images.astype(np.uint8), labels.astype(np.int32)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, delay: float = 0.0) -> list[dict]:
    out = [{"image": images[i : i + batch_size], "label": labels[i : i + batch_size]} for i in range(0, len(labels), batch_size)]
    return SlowList(out, delay) if delay else out


class SlowList(list):
    """A list of batches that takes `delay` seconds per batch (to pace a run that a test kills midway)."""

    def __init__(self, items, delay):
        super().__init__(items)
        self.delay = delay

    def __iter__(self):
        for item in super().__iter__():
            time.sleep(self.delay)
            yield item


def tiny_vit(seed: int = 0, **kw):
    return flaxvision.create_model("vit_tiny_patch16_224", num_classes=4, seed=seed, **{**TINY_VIT, **kw})


def main(run_dir: str, steps: int, resume: bool, delay: float) -> None:
    """Train the tiny ViT for `steps` steps (8 per epoch), checkpointing every 2; print the summary as JSON."""
    from flaxvision.train import TrainConfig, fit

    xt, yt = colour_data(256, 0)
    xv, yv = colour_data(40, 1)
    config = TrainConfig(
        model="vit_tiny_patch16_224", epochs=steps // 8, batch_size=32, eval_batch_size=16, optimizer="adamw", lr=3e-3,
        warmup_steps=3, weight_decay=0.05, log_every=3, checkpoint_every=2, keep_checkpoints=3, progress=False,
        model_overrides=dict(TINY_VIT), seed=3,
    )  # fmt: skip
    result = fit(
        config, run_dir=run_dir, model=tiny_vit(), train_data=batches(xt, yt, 32, delay), val_data=batches(xv, yv, 16),
        class_names=["red", "green", "blue", "grey"], resume=resume,
    )  # fmt: skip
    print(json.dumps(result.summary))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", float(sys.argv[4]))
