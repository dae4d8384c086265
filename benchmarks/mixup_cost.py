"""What mixup / CutMix on the device adds to a train step (ViT-Ti/16, 224 px, batch 32 by default).

    python benchmarks/mixup_cost.py                    # plain, mixup+CutMix per batch, per example
    python benchmarks/mixup_cost.py --model vit_tiny_patch16_224 --batch-size 32 --rounds 4 --json

The same `Trainer` is built three times (no mixing; mixup 0.8 + CutMix 1.0 per batch; the same per example) and the
compiled steps are timed in interleaved rounds (plain, batch, elem, plain, ...) on the same device batch, each step
synchronised (`block_until_ready`), so that the machine's drift hits all three alike; the median per-step time of
each is reported with the overhead against plain. On a shared machine the step-to-step noise (+-10%) is far larger
than mixing's cost, so the mixing itself is also timed alone: `mix_batch` jitted on the same normalised float batch
(median of 20 synchronised calls), as a fraction of the plain step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import jax
import numpy as np

import flaxvision
from flaxvision.train import TrainConfig, Trainer
from flaxvision.train.mixup import MixConfig, mix_batch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{name} ({'AVX-512' if ' avx512f' in out else 'AVX2' if ' avx2' in out else 'no AVX2'})"
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (each runs every variant once)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    variants = {"plain": {}, "batch": dict(mixup=0.8, cutmix=1.0, mixup_mode="batch"),
                "elem": dict(mixup=0.8, cutmix=1.0, mixup_mode="elem")}  # fmt: skip
    rng = np.random.default_rng(0)
    model = flaxvision.create_model(args.model, num_classes=100)
    size = model.preprocessing.img_size
    batch = {"image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, 100, args.batch_size).astype(np.int32)}  # fmt: skip
    trainers = {}
    for name, extra in variants.items():
        config = TrainConfig(model=args.model, batch_size=args.batch_size, optimizer="adamw", lr=1e-3,
                             label_smoothing=0.1, progress=False, **extra)  # fmt: skip
        trainer = Trainer(config, flaxvision.create_model(args.model, num_classes=100), steps_per_epoch=1000)
        device_batch = trainer.stage.put(batch)
        trainer.state = trainer.train_step(trainer.state, device_batch)  # compile + warm-up
        jax.block_until_ready(trainer.state)
        trainers[name] = (trainer, device_batch)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (trainer, device_batch) in trainers.items():
            start = time.perf_counter()
            trainer.state = trainer.train_step(trainer.state, device_batch)
            jax.block_until_ready(trainer.state)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    images = jax.numpy.asarray(batch["image"], jax.numpy.float32) / 255.0
    labels = jax.numpy.asarray(batch["label"])
    alone = {}
    for mode in ("batch", "elem"):
        cfg = MixConfig(mixup=0.8, cutmix=1.0, mode=mode, label_smoothing=0.1)
        mix = jax.jit(lambda x, y, k, cfg=cfg: mix_batch(x, y, k, cfg, 100, jax.numpy.int32(0)))
        jax.block_until_ready(mix(images, labels, jax.random.key(0)))
        runs = []
        for i in range(20):
            start = time.perf_counter()
            jax.block_until_ready(mix(images, labels, jax.random.key(i)))
            runs.append(time.perf_counter() - start)
        alone[mode] = statistics.median(runs)
    result = {"model": args.model, "batch_size": args.batch_size, "cpu": cpu_model(), "devices": jax.device_count(),
              "seconds_per_step": median, "overhead": {n: median[n] / median["plain"] - 1 for n in ("batch", "elem")},
              "mix_alone_seconds": alone, "mix_alone_fraction": {m: alone[m] / median["plain"] for m in alone},
              "all_seconds": times}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} b{args.batch_size} on {result['cpu']} ({result['devices']} device), median of {args.rounds}:")
    for name in variants:
        extra = "" if name == "plain" else f"  (+{result['overhead'][name]:.1%})"
        print(f"  {name:5s} {median[name]:.3f} s/step{extra}")
    for mode, seconds in alone.items():
        print(f"  mixing alone ({mode}): {seconds * 1e3:.2f} ms = {seconds / median['plain']:.2%} of the plain step")


if __name__ == "__main__":
    main()
