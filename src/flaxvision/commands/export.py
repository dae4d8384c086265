"""`flaxvision export`: write a run's model in transformers, timm, big_vision .npz or flaxvision format."""

from __future__ import annotations

import argparse
from pathlib import Path

from flaxvision.errors import FlaxvisionError

EPILOG = """examples:
  flaxvision export runs/food --format transformers --out exported/vit-food20   # ViTForImageClassification.from_pretrained
  flaxvision export runs/food --format timm --out exported/timm-food20
  flaxvision export runs/food --format npz --out exported/npz-food20
  flaxvision export runs/deit --weights ema --format timm --out exported/deit-ema   # a run trained with --ema-decay
  flaxvision export runs/food-lora/adapter --merge-lora --format transformers --out exported/vit-food-lora"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flaxvision.weights import FORMATS

    parser = sub.add_parser(
        "export", help="export a trained model to another format", epilog=EPILOG,
        description="Export the model of a run (or a model directory) for transformers, timm or big_vision.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory, a model directory or a LoRA adapter directory")
    parser.add_argument("--format", required=True, choices=list(FORMATS))
    parser.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory (npz: or a .npz file)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="a run trained with --ema-decay: export its raw weights (default) or their EMA")  # fmt: skip
    parser.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base's kernels "
                        "(needed to export an adapter; a LoRA run's model/ is merged already)")  # fmt: skip
    parser.set_defaults(func=run)


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, an --out that holds something (unless --overwrite), and the
    run directory itself or a directory inside it (an export there would replace the run's own files)."""
    target, src = out.resolve(), source.resolve()
    if source.exists() and (target == src or src in target.parents or target in src.parents) and not overwrite:
        raise FlaxvisionError(f"--out {out} is the run directory {source} (or inside or above it); choose another "
                              "directory, or pass --overwrite to replace it with the export")  # fmt: skip
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FlaxvisionError(f"--out {out} already exists and is not empty; choose a new directory or pass --overwrite")


def _check_lora(source: Path, args: argparse.Namespace) -> None:
    """Before anything is loaded: an adapter needs --merge-lora (no format holds one unmerged), --merge-lora needs one."""
    from flaxvision.weights.adapter import is_adapter_dir

    adapter = is_adapter_dir(source)
    if adapter and not args.merge_lora:
        raise FlaxvisionError(f"{source} is a LoRA adapter, which {args.format} format cannot express; pass "
                              "--merge-lora to export its base with the adapter merged into the kernels")  # fmt: skip
    if args.merge_lora and not (adapter or (source / "adapter").is_dir()):
        raise FlaxvisionError(f"--merge-lora: {source} holds no LoRA adapter (a LoRA run or its adapter/); drop --merge-lora")


def _merged(model):
    from flaxvision.models.lora import lora_spec, merge_lora

    return merge_lora(model) if lora_spec(model) is not None else model  # a LoRA run's model/ is merged already


def run(args: argparse.Namespace) -> int:
    from flaxvision import files
    from flaxvision.commands.common import load_model
    from flaxvision.weights import save_pretrained

    out, source = Path(args.out), Path(args.run)
    _check_out(out, source, args.overwrite)
    _check_lora(source, args)
    model = load_model(args.run, weights=args.weights, nonfinite="error")  # NaN/Inf weights are not written
    model = _merged(model) if args.merge_lora else model
    if args.format == "npz" and out.suffix == ".npz":  # one file, written atomically
        with files.scratch_dir(out.parent) as tmp:
            files.write_atomic(out, save_pretrained(model, tmp / out.name, format=args.format).read_bytes())
    else:
        with files.atomic_directory(out, overwrite=True) as tmp:
            save_pretrained(model, tmp, format=args.format)
    path = out
    print(f"flaxvision: wrote {args.format} model to {path}")
    return 0
