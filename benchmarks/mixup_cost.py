"""What mixup / CutMix on the device adds to a train step (ViT-Ti/16, 224 px, batch 32 by default).

    python benchmarks/mixup_cost.py                    # plain, mixup+CutMix per batch, per example
    python benchmarks/mixup_cost.py --model vit_tiny_patch16_224 --batch-size 32 --rounds 4 --json

The same `Trainer` is built three times (no mixing; mixup 0.8 + CutMix 1.0 per batch; the same per example) and the
compiled steps are timed in interleaved rounds (plain, batch, elem, plain, ...) on the same device batch, each step
synchronised (`block_until_ready`), so that the machine's drift hits all three alike; the median per-step time of
each is reported with the overhead against plain.
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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
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
    result = {"model": args.model, "batch_size": args.batch_size, "cpu": cpu_model(), "devices": jax.device_count(),
              "seconds_per_step": median, "overhead": {n: median[n] / median["plain"] - 1 for n in ("batch", "elem")},
              "all_seconds": times}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} b{args.batch_size} on {result['cpu']} ({result['devices']} device), median of {args.rounds}:")
    for name in variants:
        extra = "" if name == "plain" else f"  (+{result['overhead'][name]:.1%})"
        print(f"  {name:5s} {median[name]:.3f} s/step{extra}")


if __name__ == "__main__":
    main()
