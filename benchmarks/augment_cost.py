"""Host augmentation cost: CPU time per image of `decode_train` with and without RandAugment / TrivialAugment /
random erasing, in one process and one thread (what one grain worker spends per image).

    python benchmarks/augment_cost.py                   # ~1 min on one core
    python benchmarks/augment_cost.py --images 64 --rounds 3

Data, generated in memory: photo-like JPEGs (`flaxvision.data.synthetic.photo`, quality 90) with a longer side of
500 and a shorter side of 375-500, decoded by the RandomResizedCrop path to 224 px (scale 0.7-1, flip); and 32 x
32 PNGs of the same kind (8x as many) through the CIFAR path (pad 4, random crop, flip) at 32 px. ImageNet mean/std.

Rounds alternate the configurations so that machine noise hits all of them; each figure is the median over rounds
of CPU seconds (this process: `time.process_time`) per image, which other processes on a shared machine do not
change. "extra" is the cost above the plain decode of the same row.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np

from flaxvision.data.synthetic import photo
from flaxvision.data.transforms import AugmentConfig, decode_train
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

CONFIGS = {
    "plain (crop + flip)": {},
    "+ RandAugment rand-m9-mstd0.5-inc1": dict(randaugment="rand-m9-mstd0.5-inc1"),
    "+ TrivialAugment Wide": dict(trivialaugment=True),
    "+ random erasing, reprob 0.25 pixel": dict(reprob=0.25),
    "+ random erasing, reprob 1.0 pixel": dict(reprob=1.0),
    "+ RandAugment m9 + erasing 0.25": dict(randaugment="rand-m9-mstd0.5-inc1", reprob=0.25),
}


def encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def images(count: int, small: bool) -> list[bytes]:
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 10.0, (512, 512, 1)).astype(np.int16)
    if small:  # 8x as many: each timing then takes about as long as at 224 px
        return [encode(photo(rng, 32, 32, noise=noise), "PNG") for _ in range(8 * count)]
    out = []
    for _ in range(count):
        short = int(rng.integers(375, 501))
        out.append(encode(photo(rng, *((500, short) if rng.random() < 0.5 else (short, 500)), noise=noise), "JPEG"))
    return out


def per_image(data: list[bytes], preprocessing: Preprocessing, augment: AugmentConfig, round_index: int) -> float:
    """CPU seconds per image over `data`, each with the per-example RNG of (seed 0, batch round_index, row)."""
    start = time.process_time()
    for row, item in enumerate(data):
        decode_train(item, preprocessing, augment, np.random.default_rng([0, round_index, row]))
    return (time.process_time() - start) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU time per image of decode_train with and without host augmentation")
    parser.add_argument("--images", type=int, default=96, help="224 px images per configuration and round (32 px: 8x)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for label, small in (("224 px (500 px JPEG, RandomResizedCrop)", False), ("32 px (32 px PNG, pad-crop)", True)):
        data = images(args.images, small)
        size, crop = (32, "pad_crop") if small else (224, "random_resized")
        preprocessing = Preprocessing(img_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        augments = {name: AugmentConfig(crop=crop, **options) for name, options in CONFIGS.items()}
        for augment in augments.values():  # warm up: caches, lazy imports, the grammar's parse
            per_image(data[:8], preprocessing, augment, 0)
        times: dict[str, list[float]] = {name: [] for name in augments}
        for r in range(args.rounds):
            names = list(augments)
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(per_image(data, preprocessing, augments[name], r))
        base = statistics.median(times["plain (crop + flip)"])
        for name, values in times.items():
            ms = statistics.median(values) * 1e3
            rows.append((label, name, ms, ms - base * 1e3, ms / (base * 1e3)))
    print(f"{'images':<40} {'configuration':<38} {'ms/image':>9} {'extra ms':>9} {'x plain':>8}")
    for label, name, ms, extra, ratio in rows:
        print(f"{label:<40} {name:<38} {ms:>9.3f} {extra:>9.3f} {ratio:>8.2f}")


if __name__ == "__main__":
    main()
