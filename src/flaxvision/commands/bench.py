"""`flaxvision bench`: measure the parts that decide training speed. `bench input` times the input pipeline,
`bench train` the train step, `bench e2e` a preset's whole training run against PyTorch.

Each benchmark is a sub-subcommand with its own `_add_<name>` (arguments) and `_run_<name>` (runner), registered
in BENCHMARKS, so a new one (e.g. `bench train`) is one more entry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
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
        if timed >= max_batches or (seconds is not None and start is not None and time.perf_counter() - start >= seconds):
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
# bench train


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train/eval images/s, compile time and peak memory vs the PyTorch reference",
        description="Time flaxvision's train step (SGD, momentum 0.9) and eval step against transformers' "
        "ViTForImageClassification with the same batch and size, each in a fresh process; state the result "
        "as a fraction of this machine's float32 matmul roofline.",
        epilog="examples:\n  flaxvision bench train --model vit_base_patch16_224 --batch-size 8\n"
               "  flaxvision bench train --model vit_tiny_patch16_224 --batch-size 32 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    parser.add_argument("--remat", default=None, choices=["none", "dots", "full"],
                        help="what the backward pass keeps of each ViT block (default: the model's, 'dots')")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--json", action="store_true", help="print one JSON object (train_images_per_second, ...)")


def _run_train(args: argparse.Namespace) -> int:
    from flaxvision.models import model_config
    from flaxvision.train.benchmark import benchmark_train

    model_config(args.model, img_size=args.img_size)  # unknown model / bad size: a clear error before any work
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise FlaxvisionError("--batch-size and --steps must be >= 1 and --warmup >= 0")
    r = benchmark_train(args.model, args.batch_size, args.img_size, args.dtype, args.steps, args.warmup,
                        reference=not args.no_reference, remat=args.remat)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    ref = r["reference_train_images_per_second"]
    print(f"{args.model}, batch {args.batch_size}, {args.img_size} px, {args.dtype}, {r['device']}")
    print(f"  train {r['train_images_per_second']:.2f} images/s ({r['roofline_fraction']:.0%} of the "
          f"{r['roofline_gflops']:.0f} GFLOP/s matmul roofline), eval {r['eval_images_per_second']:.2f} images/s")
    print(f"  compile {r['compile_seconds']:.1f} s, first step {r['first_step_seconds']:.1f} s, peak memory {r['peak_memory_mb']:.0f} MB ({r['memory_measure']})")
    if ref:
        print(f"  reference: train {ref:.2f} images/s ({r['train_images_per_second'] / ref:.2f}x), eval "
              f"{r['reference_eval_images_per_second']:.2f} images/s, peak memory {r['reference_peak_memory_mb']:.0f} MB")
    return 0


# --------------------------------------------------------------------------------------------------------------
# bench e2e


def _add_e2e(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "e2e",
        help="a preset's whole training run, flaxvision vs the same model and recipe in PyTorch eager",
        description="Train a preset's recipe end to end with flaxvision, then the same model, optimizer, batch, "
        "augmentation and evaluation in plain PyTorch eager on uint8 tensors in memory, each in a fresh process; "
        "report training images/s (epochs 2..N: without the first epoch's compilation), wall seconds and final "
        "test accuracy of both.",
        epilog="examples:\n  flaxvision bench e2e --preset mnist-cnn --generate 60000 --epochs 2\n"
               "  flaxvision bench e2e --preset cifar10-resnet18 --generate 50000 --test-size 10000 --epochs 2\n"
               "  flaxvision bench e2e --preset mnist-cnn --dataset ./mnist --epochs 2 --set workers=2 --json\n"
               "benchmarks/e2e.sh has the rows of BENCHMARKS.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--preset", required=True, help="a recipe from `flaxvision presets` with a PyTorch twin "
                        "(mnist-cnn, cifar10-resnet18)")  # fmt: skip
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="DIR", help="a save_to_disk directory with train and test splits")
    data.add_argument("--generate", type=int, metavar="N",
                      help="write a generated dataset of N training images of the preset's shape first")
    parser.add_argument("--test-size", type=int, metavar="M", help="with --generate: test images (default N / 6)")
    parser.add_argument("--out", type=Path, help="with --generate: where to write it (default: a temporary "
                        "directory, removed afterwards)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="with --generate: the data's seed (default 0)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs on both sides (default 2: epoch 2 is timed "
                        "without compilation)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field on both sides, e.g. --set batch_size=64 (repeatable)")
    parser.add_argument("--no-torch", action="store_true", help="run the flaxvision side only")
    parser.add_argument("--torch-threads", type=int, metavar="T",
                        help="torch's threads (default: every core; on a busy machine 1 can be faster: OpenMP "
                             "threads spin while they wait for each other)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run_e2e(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from flaxvision.models import model_config
    from flaxvision.presets import get_preset
    from flaxvision.train.e2e_bench import benchmark_e2e, check_torch_recipe, parse_override

    if min(args.epochs, args.generate or 1, args.test_size or 1, args.torch_threads or 1) < 1:
        raise FlaxvisionError("--epochs, --generate, --test-size and --torch-threads must be >= 1")
    if args.generate is None and (args.out or args.test_size):
        raise FlaxvisionError("--out and --test-size go with --generate N")
    overrides = dict(parse_override(text) for text in args.overrides)
    for field in ("epochs", "dataset"):
        if field in overrides:
            raise FlaxvisionError(f"--set {field}=...: pass --{field} instead (it applies to both sides)")
    # progress off: the bar goes to a captured stream; report off: plots are not training.
    config = get_preset(args.preset).replace(**{"report": False, "progress": False, **overrides}, epochs=args.epochs)
    if not args.no_torch:
        check_torch_recipe(config)  # before writing any data
    tmp = None
    dataset = args.dataset
    if args.generate is not None:
        from flaxvision.data.synthetic import write_class_dataset

        if config.model is None:
            raise FlaxvisionError(f"preset {args.preset!r} names no model; --generate needs its image shape")
        model = model_config(config.model, img_size=config.img_size)  # the preset's image shape and classes
        target = args.out or Path(tmp := tempfile.mkdtemp(prefix="flaxvision-e2e-data-")) / "data"
        start = time.perf_counter()
        write_class_dataset(target, train=args.generate, test=args.test_size or max(args.generate // 6, 1),
                            side=model.img_size, channels=model.in_chans, num_classes=model.num_classes, seed=args.seed)  # fmt: skip
        print(f"flaxvision: wrote {args.generate} generated training images to {target} in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)  # fmt: skip
        dataset = str(target)
    try:  # no torch: TorchMissing, one line and exit 2 from the CLI, before any work
        r = benchmark_e2e(config.replace(dataset=dataset), preset=args.preset, torch=not args.no_torch,
                         torch_threads=args.torch_threads)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.generate is not None and args.out is None:
        r["dataset"] = f"generated: {args.generate} train / {args.test_size or max(args.generate // 6, 1)} test images, seed {args.seed}"
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    _print_e2e(r)
    return 0


def _print_e2e(r: dict[str, Any]) -> None:
    fv, tr, m = r["flaxvision"], r["torch"], r["machine"]
    rate = "images/s (epochs 2..N)" if fv["steady"] else "images/s (epoch 1, with compile)"
    print(f"{r['preset']} ({r['model']}), batch {r['batch_size']}, {r['epochs']} epoch(s), {r['dataset']}")
    print(f"{m['cpu']}, {m['cores']} cores; jax {fv['jax_version']}, flax {fv['flax_version']}"
          + (f", torch {tr['torch_version']} ({tr['threads']} thread{'s' * (tr['threads'] != 1)})" if tr else ""))  # fmt: skip
    print(f"  {'':12}{rate:>34}{'wall s':>10}{'test acc':>10}")
    for name, side in (("flaxvision", fv), ("torch", tr)):
        if side:
            print(f"  {name:12}{side['images_per_second']:>34.1f}{side['wall_seconds']:>10.1f}{side['final_accuracy']:>10.4f}")
    if tr:
        ratio = r["ratio"]
        print(f"  {'fv / torch':12}{ratio['images_per_second']:>33.2f}x{ratio['wall_seconds']:>9.2f}x")
        print(f"  (torch decoded the dataset into tensors in {tr['decode_seconds']:.1f} s, not counted; flaxvision's "
              f"wall includes {fv['setup_seconds']:.1f} s of set-up before its first step)")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------

# Name -> (add the sub-subcommand's arguments, run it).
BENCHMARKS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "input": (_add_input, _run_input),
    "train": (_add_train, _run_train),
    "e2e": (_add_e2e, _run_e2e),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks: input pipeline, train step and end-to-end training throughput",
        description="Measure what decides training speed. Numbers for the reference setups are in BENCHMARKS.md.",
        epilog="examples:\n  flaxvision bench input --dataset ethz/food101 --workers 4 --json\n"
               "  flaxvision bench train --model vit_base_patch16_224 --batch-size 8\n"
               "  flaxvision bench e2e --preset mnist-cnn --generate 60000 --epochs 2",
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
