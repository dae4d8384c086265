"""`flaxvision export`: write a run's model in transformers, timm, big_vision .npz or flaxvision format, or as a
program that runs without flaxvision: ONNX (onnxruntime) or StableHLO (`jax.export`, only jax needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flaxvision.errors import FlaxvisionError

EPILOG = """examples:
  flaxvision export runs/food --format transformers --out exported/vit-food20   # ViTForImageClassification.from_pretrained
  flaxvision export runs/food --format timm --out exported/timm-food20
  flaxvision export runs/food --format npz --out exported/npz-food20
  flaxvision export runs/deit --weights ema --format timm --out exported/deit-ema   # a run trained with --ema-decay
  flaxvision export runs/food-lora/adapter --merge-lora --format transformers --out exported/vit-food-lora
  flaxvision export runs/food --format onnx --out exported/onnx-food20      # model.onnx: uint8 NHWC "image" -> "logits"
  flaxvision export runs/food --format onnx --input float --out exported/onnx-nchw   # NCHW normalised "pixel_values"
  flaxvision export runs/food --format onnx --input-size 480x640 --out exported/onnx-vga   # resize + crop inside
  flaxvision export runs/food --format stablehlo --platforms cpu,cuda --out exported/hlo-food20   # model.jax_export

programs (onnx, stablehlo): --out receives the program and metadata.json (labels, preprocessing, input and output);
the batch size is free. --input uint8 (default) takes decoded pixels and normalises inside; --input-size HxW also
bakes in the model's eval resize and centre crop for images of exactly that size."""

PROGRAMS = ("onnx", "stablehlo")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flaxvision.weights import FORMATS

    parser = sub.add_parser(
        "export", help="export a trained model to another format", epilog=EPILOG,
        description="Export the model of a run (or a model directory) for transformers, timm or big_vision, or as "
                    "a program that runs without flaxvision: ONNX (onnxruntime) or StableHLO (jax.export).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory, a model directory or a LoRA adapter directory")
    parser.add_argument("--format", required=True, choices=[*FORMATS, *PROGRAMS])
    parser.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory (npz: or a .npz file)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="a run trained with --ema-decay: export its raw weights (default) or their EMA")  # fmt: skip
    parser.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base's kernels "
                        "(needed to export an adapter; a LoRA run's model/ is merged already)")  # fmt: skip
    parser.add_argument("--input", choices=("uint8", "float"), default=None,
                        help="onnx/stablehlo: uint8 NHWC pixels, normalised inside (default), or float NCHW "
                        "already normalised")  # fmt: skip
    parser.add_argument("--input-size", metavar="HxW", default=None,
                        help="onnx/stablehlo with uint8 input: take HxW images and resize + centre-crop inside")
    parser.add_argument("--platforms", metavar="LIST", default=None,
                        help="stablehlo: comma-separated platforms to lower for (default cpu,cuda,tpu; also rocm)")
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


def _input_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise FlaxvisionError(f"--input-size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 480x640")
    return int(parts[0]), int(parts[1])


def _program_options(args: argparse.Namespace) -> dict:
    """Before anything is loaded: the program flags, which only onnx and stablehlo take, checked; their values."""
    from flaxvision.ship import program

    given = [flag for flag, value in (("--input", args.input), ("--input-size", args.input_size),
                                      ("--platforms", args.platforms)) if value is not None]  # fmt: skip
    if args.format not in PROGRAMS:
        if given:
            raise FlaxvisionError(f"{given[0]} applies to --format onnx or stablehlo, not to the {args.format} "
                                  f"weight format; drop {given[0]}")  # fmt: skip
        return {}
    if args.platforms is not None and args.format != "stablehlo":
        raise FlaxvisionError("--platforms applies to --format stablehlo (ONNX runs on any onnxruntime provider); "
                              "drop --platforms")  # fmt: skip
    options = {"input": args.input or "uint8", "input_size": _input_size(args.input_size)}
    program.check_input(options["input"], options["input_size"])
    if args.format == "onnx":
        from flaxvision.ship.onnx_export import require

        require()
    else:
        from flaxvision.ship.stablehlo import DEFAULT_PLATFORMS, check_platforms

        names = DEFAULT_PLATFORMS if args.platforms is None else [p.strip() for p in args.platforms.split(",")]
        options["platforms"] = check_platforms(names)
    return options


def _write_program(model, out_dir: Path, args: argparse.Namespace, options: dict) -> None:
    if args.format == "onnx":
        from flaxvision.ship.onnx_export import to_onnx_dir

        to_onnx_dir(model, out_dir, source=args.run, debug=getattr(args, "debug", False), **options)
    else:
        from flaxvision.ship.stablehlo import to_stablehlo

        to_stablehlo(model, out_dir, source=args.run, **options)


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
    options = _program_options(args)
    model = load_model(args.run, weights=args.weights, nonfinite="error")  # NaN/Inf weights are not written
    model = _merged(model) if args.merge_lora else model
    if args.format in PROGRAMS:
        with files.atomic_directory(out, overwrite=True) as tmp:
            _write_program(model, tmp, args, options)
    elif args.format == "npz" and out.suffix == ".npz":  # one file, written atomically
        with files.scratch_dir(out.parent) as tmp:
            files.write_atomic(out, save_pretrained(model, tmp / out.name, format=args.format).read_bytes())
    else:
        with files.atomic_directory(out, overwrite=True) as tmp:
            save_pretrained(model, tmp, format=args.format)
    path = out
    print(f"flaxvision: wrote {args.format} model to {path}")
    return 0
