"""Sharded data: training-loader images/s from WebDataset tar shards vs the same photos as a `save_to_disk`
directory, and what resize-on-pack buys; pack time and bytes on disk. One run, one machine: compare the ratios.

    python benchmarks/shards.py --out /tmp/flaxvision-shards            # ~3-5 minutes on 2 cores
    python benchmarks/shards.py --out /tmp/flaxvision-shards --images 4000 --rounds 5

Data: `--images` Food-101-sized photo-like JPEGs (`flaxvision.data.synthetic.write_image_folder`: smooth colour
fields and soft shapes with sensor-like grain, longer side 512, shorter side 384-512, quality 85), `--classes`
classes, as an image folder (plus 2 validation images per class), and that folder as a `save_to_disk` directory
with the image bytes embedded (`folder_to_disk`, an Image + ClassLabel column as the Hub's Food-101 has). Generated
once per --out and reused while --images, --classes and --seed stay the same.

Packing: `flaxvision data pack FOLDER --out DIR` (wds, one process, the original JPEG bytes) and again with
`--resize 256 --quality 90`, each as a fresh command; the pack seconds are the manifest's (the pack itself,
without the interpreter's start), bytes on disk are the files' sizes.

Loading: `flaxvision.data.load(DIR)` + `make_loader(train=True, workers=2, batch 32)` with ViT-B/16's 224 px
preprocessing (RandomResizedCrop 0.7-1.0 + flip on the host, uint8 batches), timed after warm-up batches; the
three sources are timed in interleaved rounds (rotating order, each started after the previous one's workers
are gone), medians over rounds, and images per CPU-second of the whole process tree, which neighbours' load
changes less than wall-clock rates. The files sit on the local disk, in the page cache after generation.

Prints one JSON line with every number and the ratios (tar / save_to_disk, resized / not resized).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from input_pipeline import cpu_seconds, settle  # (this directory: the same CPU-time and settling helpers)

SOURCES = ("save_to_disk", "wds", "wds_resized")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate(root: Path, images: int, classes: int, seed: int) -> tuple[Path, Path]:
    """The image folder and its save_to_disk copy under `root` (reused when made with the same settings)."""
    from flaxvision.data.synthetic import folder_to_disk, write_image_folder

    folder, arrow, marker = root / "folder", root / "save_to_disk", root / "generated.json"
    settings = {"images": images, "classes": classes, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings and (arrow / "dataset_dict.json").is_file():
        note(f"reusing the photos in {folder} and {arrow}")
        return folder, arrow
    import shutil

    for old in (folder, arrow, marker):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    start = time.perf_counter()
    write_image_folder(folder, num_classes=classes, per_split={"train": -(-images // classes), "validation": 2},
                       max_side=512, min_side=384, seed=seed)  # fmt: skip
    folder_to_disk(folder, arrow)
    marker.write_text(json.dumps(settings))
    note(f"generated {images} photos in {folder} and {arrow} in {time.perf_counter() - start:.0f} s")
    return folder, arrow


def pack(folder: Path, out: Path, shard_size: str, resize: int | None) -> dict[str, Any]:
    """Run `flaxvision data pack` as a user would; its seconds (the manifest's and the command's), size, shards."""
    command = [sys.executable, "-m", "flaxvision", "data", "pack", str(folder), "--out", str(out), "--shard-size",
               shard_size, "--no-progress", "--overwrite"]  # fmt: skip
    if resize is not None:
        command += ["--resize", str(resize), "--quality", "90"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    size = bytes_under(out)
    note(f"packed {out} in {manifest['seconds']:.1f} s ({len(train['shards'])} train shards, {size / 1e6:.1f} MB)")
    return {"seconds": manifest["seconds"], "command_seconds": round(wall, 2), "bytes": size,
            "train_shards": len(train["shards"]), "train_examples": train["count"],
            "command": " ".join(["flaxvision", *command[3:]])}


def loader_for(path: Path, workers: int, batch_size: int, seed: int) -> Any:
    from flaxvision.data import load, make_loader
    from flaxvision.models.registry import model_config, named_preprocessing

    preprocessing = named_preprocessing("vit_base_patch16_224", model_config("vit_base_patch16_224"))
    data = load(str(path), seed=seed)
    return make_loader(data.train, preprocessing=preprocessing, batch_size=batch_size, train=True, seed=seed,
                       num_epochs=None, workers=workers)  # fmt: skip


def time_loader(loader: Any, warmup: int, timed: int) -> tuple[float, float]:
    """(images per second, images per CPU-second) of `timed` host batches after `warmup` batches."""
    iterator = iter(loader)
    try:
        for _ in range(warmup):
            next(iterator)
        wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
        for _ in range(timed):
            images += int(next(iterator)["mask"].sum())
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    finally:
        iterator.close()
        loader.close()
    return images / wall, images / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="working directory (photos, copies, shards)")
    parser.add_argument("--images", type=int, default=2000, help="training photos (default 2000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shard-size", default="16MB", help="--shard-size of the packs (default 16MB)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per source and round (default 60)")
    parser.add_argument("--warmup", type=int, default=4, help="batches not timed (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images < 10 * args.classes or args.rounds < 1 or args.batches < 1:
        parser.error("use --images of at least 10 per class, --rounds >= 1 and --batches >= 1")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    folder, arrow = generate(args.out, args.images, args.classes, args.seed)
    packs = {"wds": pack(folder, args.out / "wds", args.shard_size, None),
             "wds_resized": pack(folder, args.out / "wds-256", args.shard_size, 256)}  # fmt: skip
    paths = {"save_to_disk": arrow, "wds": args.out / "wds", "wds_resized": args.out / "wds-256"}

    speed: dict[str, list[float]] = {name: [] for name in SOURCES}
    per_cpu: dict[str, list[float]] = {name: [] for name in SOURCES}
    for round_index in range(args.rounds):
        shift = round_index % len(SOURCES)  # rotate the order: no source always runs right after another one
        for name in SOURCES[shift:] + SOURCES[:shift]:
            rate, efficiency = time_loader(loader_for(paths[name], args.workers, args.batch_size, args.seed),
                                           args.warmup, args.batches)  # fmt: skip
            settle()
            speed[name].append(rate)
            per_cpu[name].append(efficiency)
            note(f"round {round_index + 1}: {name:<13} {rate:7.1f} images/s {efficiency:7.1f} images/CPU-s")

    median = {k: statistics.median(v) for k, v in speed.items()}
    median_cpu = {k: statistics.median(v) for k, v in per_cpu.items()}

    def within_rounds(a: str, b: str) -> float:  # the ratio in each round (runs seconds apart), then the median
        return round(statistics.median(x / y for x, y in zip(speed[a], speed[b], strict=True)), 3)

    cpu_model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                      text=True).stdout.splitlines() if line.startswith("Model name")), None)  # fmt: skip
    summary = {
        "cpu_model": cpu_model, "cpus": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()], "images": args.images, "classes": args.classes,
        "train_examples": packs["wds"]["train_examples"], "workers": args.workers, "batch_size": args.batch_size,
        "img_size": 224, "rounds": args.rounds, "timed_batches_per_round": args.batches, "warmup_batches": args.warmup,
        "bytes": {"folder": bytes_under(folder), "save_to_disk": bytes_under(arrow), "wds": packs["wds"]["bytes"],
                  "wds_resized": packs["wds_resized"]["bytes"]},
        "pack": packs,
        "images_per_second": {k: round(v, 1) for k, v in median.items()},
        "images_per_cpu_second": {k: round(v, 1) for k, v in median_cpu.items()},
        "per_round": {k: [round(x, 1) for x in v] for k, v in speed.items()},
        "ratios": {
            "wds_vs_save_to_disk": round(median["wds"] / median["save_to_disk"], 3),
            "wds_vs_save_to_disk_within_rounds": within_rounds("wds", "save_to_disk"),
            "wds_vs_save_to_disk_per_cpu_second": round(median_cpu["wds"] / median_cpu["save_to_disk"], 3),
            "resized_vs_not": round(median["wds_resized"] / median["wds"], 3),
            "resized_vs_not_within_rounds": within_rounds("wds_resized", "wds"),
            "resized_vs_not_per_cpu_second": round(median_cpu["wds_resized"] / median_cpu["wds"], 3),
            "resized_bytes_vs_not": round(packs["wds_resized"]["bytes"] / packs["wds"]["bytes"], 3),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    # The repo's src/ for this process and the `flaxvision data pack` commands, also without PYTHONPATH=src.
    SRC = str(Path(__file__).resolve().parents[1] / "src")
    if SRC not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, SRC)
    main()
