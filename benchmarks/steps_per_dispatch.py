"""Steps per device call: one train step per call against K steps in one `lax.scan` call, same model and batch.

    python benchmarks/steps_per_dispatch.py --model cnn --batch-size 32 --k 1 4 10
    python benchmarks/steps_per_dispatch.py --model digits-vit --batch-size 64 --k 1 4

Prints ms per step (after warm-up, timed with the device synchronised) and the compile time for each K, and the
CPU model. `digits-vit` is the default run's model (the digits-vit preset's ViT at 16 px, 1 channel).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import flaxvision
from flaxvision.presets import get_preset
from flaxvision.train import TrainConfig, Trainer
from flaxvision.train.instrument import cpu_model


def build(model: str, batch: int, k: int) -> tuple[Trainer, int, int]:
    if model == "digits-vit":
        preset = get_preset("digits-vit")
        net = flaxvision.create_model(preset.model, num_classes=10, img_size=16, in_chans=1, **preset.model_overrides)
        config = preset.replace(batch_size=batch, steps_per_dispatch=k)
    else:
        net = flaxvision.create_model(model)
        config = TrainConfig(model=model, batch_size=batch, optimizer="adamw", lr=1e-3, steps_per_dispatch=k)
    trainer = Trainer(config, net, steps_per_epoch=10_000, devices=jax.devices()[:1])
    return trainer, net.config.img_size, net.config.in_chans


def measure(model: str, batch: int, k: int, seconds: float) -> dict:
    trainer, size, chans = build(model, batch, k)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (k, batch, size, size, chans), dtype=np.uint8)
    labels = rng.integers(0, 10, (k, batch)).astype(np.int32)
    if k == 1:
        data = trainer.stage.put({"image": images[0], "label": labels[0]})
        call = lambda state: trainer.train_step(state, data)  # noqa: E731
    else:
        data = trainer.stage.put_group({"image": images, "label": labels})
        call = lambda state: trainer.train_steps(state, data)  # noqa: E731  # pyright: ignore[reportOptionalCall]
    state = trainer.state
    start = time.perf_counter()
    state = call(state)
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - start
    for _ in range(2):
        state = call(state)
    jax.block_until_ready(state)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        state = call(state)
        calls += 1
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    return {"model": model, "batch_size": batch, "k": k, "ms_per_step": 1e3 * elapsed / (calls * k),
            "images_per_second": calls * k * batch / elapsed, "compile_seconds": compile_seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    rows = [measure(args.model, args.batch_size, k, args.seconds) for k in args.k]
    print(json.dumps({"cpu": cpu_model(), "devices": jax.device_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
