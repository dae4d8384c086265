"""`flaxvision export`: write a run's model in transformers, timm, big_vision .npz or flaxvision format."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  flaxvision export runs/food --format transformers --out exported/vit-food20   # ViTForImageClassification.from_pretrained
  flaxvision export runs/food --format timm --out exported/timm-food20
  flaxvision export runs/food --format npz --out exported/npz-food20"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flaxvision.weights import FORMATS

    parser = sub.add_parser(
        "export", help="export a trained model to another format", epilog=EPILOG,
        description="Export the model of a run (or a model directory) for transformers, timm or big_vision.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory or a model directory")
    parser.add_argument("--format", required=True, choices=list(FORMATS))
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flaxvision.commands.common import load_model
    from flaxvision.weights import save_pretrained

    model = load_model(args.run)
    path = save_pretrained(model, args.out, format=args.format)
    print(f"flaxvision: wrote {args.format} model to {path}")
    return 0
