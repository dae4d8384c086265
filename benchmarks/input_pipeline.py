"""Input pipeline: flaxvision vs the tutorial-style baseline, same data, same workers, same run.

    python benchmarks/input_pipeline.py --workers 2            # generates the data on first use (~1 min)

Data: a Food-101-shaped dataset written by `flaxvision.data.synthetic` (photo-like JPEGs, longer side 512,
101 classes) and saved with `datasets.save_to_disk`, image bytes embedded as on the Hub.

Baseline (what the ViT tutorial does): `datasets.with_transform` decoding PIL images, torchvision v2
RandomResizedCrop(224, scale 0.7-1.0) + RandomHorizontalFlip + ColorJitter(0.2, 0.2, 0.2), float32 normalisation
on the host, grain.DataLoader with `--workers` processes and Batch(drop_remainder).
flaxvision: `flaxvision.data.load` + `make_loader(train=True)`: same crop and flip on the host, uint8 batches,
jitter + normalisation left to the device. Both are timed up to batches on the JAX device (block_until_ready;
both put their numpy batches there with jax.device_put); "flaxvision+device" also runs the jitted jitter +
normalisation (`flaxvision.data.device_preprocess`, with the loader's `augment` jitter) on each batch, which on a
CPU-only machine is CPU time too.

Rounds alternate the pipelines (in a rotating order, each started after the previous one's workers are gone) so
that machine noise hits all of them; the ratio of medians is the result. On a shared
machine wall-clock rates swing with the neighbours' load, so the script also reports images per CPU-second of the
whole process tree (main process + workers), which other processes on the machine do not change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HALF = np.array([0.5, 0.5, 0.5], np.float32)


def make_dataset(root: Path, num_classes: int, per_class: int) -> Path:
    """Write the image tree and its save_to_disk copy (once); return the save_to_disk directory."""
    from flaxvision.data.synthetic import folder_to_disk, write_image_folder

    target = root / f"hf_{num_classes}x{per_class}"
    if (target / "dataset_dict.json").exists():
        return target
    folder = root / f"jpeg_{num_classes}x{per_class}"
    start = time.perf_counter()
    write_image_folder(folder, num_classes=num_classes, per_split={"train": per_class, "validation": 2}, seed=0)
    folder_to_disk(folder, target)
    print(f"generated {target} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target


class TutorialTransform:
    """The tutorial's host-side train transform: torchvision v2 on PIL images, then float32 normalisation."""

    def __init__(self, img_size: int):
        from torchvision.transforms import v2

        self.transform = v2.Compose([
            v2.RandomResizedCrop((img_size, img_size), scale=(0.7, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2),
        ])

    def __call__(self, batch: dict) -> dict:
        images = []
        for image in batch["image"]:
            pixels = np.asarray(self.transform(image.convert("RGB")), np.float32) / 255.0
            images.append((pixels - HALF) / HALF)
        batch["image"] = images
        return batch


def baseline_batches(path: Path, workers: int, batch_size: int, img_size: int, seed: int):
    import datasets
    import grain.python as pygrain
    import jax
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (google/grain#1355); a plain script never parses
    splits = datasets.load_from_disk(str(path))
    assert isinstance(splits, datasets.DatasetDict)
    train: Any = splits["train"].with_transform(TutorialTransform(img_size))  # a grain RandomAccessDataSource
    sampler = pygrain.IndexSampler(len(train), shuffle=True, seed=seed, shard_options=pygrain.NoSharding(),
                                   num_epochs=None)
    loader = pygrain.DataLoader(data_source=train, sampler=sampler, worker_count=workers, worker_buffer_size=2,
                                operations=[pygrain.Batch(batch_size, drop_remainder=True)])
    for batch in loader:
        yield jax.device_put({"image": batch["image"], "label": batch["label"]})


def flaxvision_batches(path: Path, workers: int, batch_size: int, img_size: int, seed: int, device: bool,
                       draft_min_fraction: float = 1.0):
    import jax

    from flaxvision import Preprocessing
    from flaxvision.data import AugmentConfig, device_preprocess, load, make_loader

    data = load(str(path), seed=seed)
    pre = Preprocessing(img_size=img_size)
    loader = make_loader(data.train, preprocessing=pre, batch_size=batch_size, train=True, seed=seed,
                         num_epochs=None, workers=workers, augment=AugmentConfig(draft_min_fraction=draft_min_fraction))
    augment = loader.augment
    assert augment is not None
    preprocess = jax.jit(lambda images, key: device_preprocess(
        images, pre.mean, pre.std, rng=key, brightness=augment.brightness, contrast=augment.contrast,
        saturation=augment.saturation))
    key = jax.random.key(seed)
    try:
        for step, host in enumerate(loader):
            batch = jax.device_put({"image": host["image"], "label": host["label"]})
            if device:
                batch = {"image": preprocess(batch["image"], jax.random.fold_in(key, step)), "label": batch["label"]}
            yield batch
    finally:
        loader.close()


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its live descendants (the pipelines' workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def settle(timeout: float = 60.0) -> None:
    """Wait until the previous pipeline's worker processes are gone, so they cannot slow down the next one."""
    import gc

    import psutil

    def is_worker(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(process.cmdline())
        except psutil.Error:
            return False

    gc.collect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_worker(p) for p in psutil.Process().children(recursive=True)):
        time.sleep(0.2)
    time.sleep(1.0)


def time_pipeline(batches, warmup: int, timed: int) -> tuple[float, float]:
    """(images per second, images per CPU-second) over `timed` batches after `warmup` batches."""
    import jax

    iterator = iter(batches)
    for _ in range(warmup):
        jax.block_until_ready(next(iterator))
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for _ in range(timed):
        batch = next(iterator)
        jax.block_until_ready(batch)
        images += len(batch["label"])
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return images / wall, images / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "flaxvision-bench")
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--draft-min-fraction", type=float, default=None,
                        help="also time flaxvision with AugmentConfig(draft_min_fraction=...)")
    parser.add_argument("--skip-device", action="store_true", help="leave out the flaxvision+device variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    path = make_dataset(args.data, args.classes, args.per_class)
    common = (path, args.workers, args.batch_size, args.img_size, args.seed)
    pipelines = {
        "baseline": lambda: baseline_batches(*common),
        "flaxvision": lambda: flaxvision_batches(*common, device=False),
        "flaxvision+device": lambda: flaxvision_batches(*common, device=True),
    }
    if args.skip_device:
        del pipelines["flaxvision+device"]
    if args.draft_min_fraction is not None:
        fraction = args.draft_min_fraction
        pipelines[f"flaxvision draft>={fraction:g}"] = lambda: flaxvision_batches(*common, device=False,
                                                                                  draft_min_fraction=fraction)
    speed: dict[str, list[float]] = {name: [] for name in pipelines}
    efficiency: dict[str, list[float]] = {name: [] for name in pipelines}
    names = list(pipelines)
    for round_index in range(args.rounds):
        shift = round_index % len(names)  # rotate the order: no pipeline always runs right after another one
        for name in names[shift:] + names[:shift]:
            batches = pipelines[name]()
            per_second, per_cpu_second = time_pipeline(batches, args.warmup, args.batches)
            batches.close()
            settle()
            speed[name].append(per_second)
            efficiency[name].append(per_cpu_second)
            print(f"round {round_index + 1}: {name:<18} {per_second:7.1f} images/s "
                  f"{per_cpu_second:7.1f} images/CPU-s", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in speed.items()}
    per_cpu = {name: statistics.median(values) for name, values in efficiency.items()}
    summary = {
        "workers": args.workers, "batch_size": args.batch_size, "img_size": args.img_size,
        "cpus": len(os.sched_getaffinity(0)), "load_average": [round(x, 2) for x in os.getloadavg()],
        "images_per_second": {k: round(v, 1) for k, v in median.items()},
        "images_per_cpu_second": {k: round(v, 1) for k, v in per_cpu.items()},
        "rounds": {k: [round(v, 1) for v in values] for k, values in speed.items()},
        "speedup": round(median["flaxvision"] / median["baseline"], 2),
        "speedup_per_cpu_second": round(per_cpu["flaxvision"] / per_cpu["baseline"], 2),
        "speedups": {k: round(v / median["baseline"], 2) for k, v in median.items()},
        # The same ratio taken within each round (the pipelines there ran minutes apart at most), then the median:
        "speedups_within_rounds": {
            k: round(statistics.median(a / b for a, b in zip(values, speed["baseline"], strict=True)), 2) for k, values in speed.items()
        },
        "speedups_per_cpu_second": {k: round(v / per_cpu["baseline"], 2) for k, v in per_cpu.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.workers} workers, batch {args.batch_size}, {args.img_size} px, median of {args.rounds} rounds:")
    for name in pipelines:
        print(f"  {name:<24} {median[name]:7.1f} images/s ({summary['speedups'][name]:.2f}x, "
              f"{summary['speedups_within_rounds'][name]:.2f}x within rounds)  "
              f"{per_cpu[name]:7.1f} images/CPU-s ({summary['speedups_per_cpu_second'][name]:.2f}x)")


if __name__ == "__main__":
    main()
