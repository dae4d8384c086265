"""`flaxvision bench`: measure the parts that decide training speed. `bench input` times the input pipeline.

Each benchmark is a sub-subcommand with its own `_add_<name>` (arguments) and `_run_<name>` (runner), registered
in BENCHMARKS, so a new one (e.g. `bench train`) is one more entry.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from flaxvision.errors import FlaxvisionError


def measure(batches: Iterable[dict[str, Any]], *, max_batches: int, warmup: int = 2,
            seconds: float | None = None) -> dict[str, float]:
    """Images/s of an iterable of batches, counted once each batch is ready on its device.

    The first `warmup` batches (worker start-up, compilation of transfers) are not timed. Stops after
    `max_batches` timed batches, after `seconds` if given, or when the iterable ends.
    """
    import jax

    images, timed = 0, 0
    start = time.perf_counter() if warmup == 0 else None
    for index, batch in enumerate(batches):
        jax.block_until_ready(batch)
        if index < warmup:
            if index == warmup - 1:
                start = time.perf_counter()
            continue
        images += len(batch["label"])
        timed += 1
        if timed >= max_batches or (seconds is not None and time.perf_counter() - start >= seconds):
            break
    if start is None or timed == 0:
        raise FlaxvisionError(
            f"the dataset gave only {warmup + timed} batch(es): too few to time after {warmup} warm-up batch(es); "
            "use a smaller --batch-size or a bigger dataset"
        )
    elapsed = time.perf_counter() - start
    return {"images_per_second": images / elapsed, "images": images, "batches": timed, "seconds": elapsed}


# --------------------------------------------------------------------------------------------------------------
# bench input


def _add_input(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "input",
        help="images/s of the input pipeline, up to uint8 batches on the device",
        description="Time the training input pipeline (decode, random crop, flip, batch, transfer) on a dataset.",
        epilog="examples:\n  flaxvision bench input --dataset ethz/food101 --workers 4\n"
               "  flaxvision bench input --dataset ./images --batch-size 64 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, metavar="SPEC",
                        help="Hub id, save_to_disk directory, parquet file(s)/directory, or image folder")
    parser.add_argument("--split", default=None, help="split to read (default: train)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default 0: in-process threads)")
    parser.add_argument("--threads", type=int, default=None, help="decoding threads per process")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224, help="output side in pixels (default 224)")
    parser.add_argument("--batches", type=int, default=50, help="batches to time after warm-up (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="batches not timed (default 3)")
    parser.add_argument("--eval", action="store_true", help="time the eval pipeline (resize only) instead")
    parser.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true",
                        help="print {images_per_second, images, skipped, workers, ...} as JSON")


def _run_input(args: argparse.Namespace) -> int:
    from flaxvision.data import load, make_loader
    from flaxvision.preprocessing import Preprocessing

    for name in ("workers", "batch_size", "img_size", "batches"):
        value = getattr(args, name)
        if value < (0 if name == "workers" else 1):
            raise FlaxvisionError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else '>= 1'}, "
                                  f"got {value}")
    data = load(args.dataset, train_split=args.split, seed=args.seed)
    preprocessing = Preprocessing(img_size=args.img_size).for_channels(data.num_channels)
    loader = make_loader(
        data.train, preprocessing=preprocessing, batch_size=args.batch_size, train=not args.eval, seed=args.seed,
        num_epochs=None, workers=args.workers, threads=args.threads, draft=not args.no_draft,
    )
    iterator = iter(loader)
    try:
        result = measure(iterator, max_batches=args.batches, warmup=args.warmup)
    finally:
        iterator.close()
    result.update(skipped=loader.skipped.count, workers=args.workers, batch_size=args.batch_size,
                  img_size=args.img_size, dataset=args.dataset, examples=len(data.train))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['images_per_second']:.1f} images/s ({result['images']} images in {result['seconds']:.2f} s, "
              f"{args.workers} worker(s), batch {args.batch_size}, {args.img_size} px, "
              f"{result['skipped']} unusable image(s) skipped)")
    return 0


# --------------------------------------------------------------------------------------------------------------

# Name -> (add the sub-subcommand's arguments, run it).
BENCHMARKS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "input": (_add_input, _run_input),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks: input pipeline throughput",
        description="Measure what decides training speed. Numbers for the reference setups are in BENCHMARKS.md.",
        epilog="examples:\n  flaxvision bench input --dataset ethz/food101 --workers 4 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    benches = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for add, _ in BENCHMARKS.values():
        add(benches)
    parser.set_defaults(func=run, bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.benchmark is None:
        args.bench_parser.print_help()
        return 2
    return BENCHMARKS[args.benchmark][1](args)
