"""`flaxvision card`: the model card (README.md) of a finished run, to stdout or a file."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  flaxvision card runs/food                                   # to stdout
  flaxvision card runs/food --repo-id me/vit-food20 --out README.md
  flaxvision card runs/deit --weights ema --format timm"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flaxvision.ship.card import LAYOUTS

    parser = sub.add_parser(
        "card",
        help="write the model card (README.md) of a run",
        epilog=EPILOG,
        description="A Hub model card from a run's files: metrics with their split, the command, data, recipe, hardware.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument("--out", metavar="FILE", help="write the card here (atomically) instead of to stdout")
    parser.add_argument(
        "--format",
        choices=list(LAYOUTS),
        help="the weights' layout the card describes (default: that of the run's model/)",
    )
    parser.add_argument("--repo-id", metavar="OWNER/NAME", help="the Hub repo the card is for (its usage snippets)")
    parser.add_argument(
        "--weights", choices=("raw", "ema"), default="raw", help="which final weights the card describes"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flaxvision.errors import FlaxvisionError
    from flaxvision.files import write_atomic
    from flaxvision.ship.card import model_card, model_layout, read_run

    if args.out is not None and Path(args.out).is_dir():
        raise FlaxvisionError(
            f"--out {args.out} is a directory; pass a file name such as {Path(args.out) / 'README.md'}"
        )
    if args.weights == "ema" and not (Path(args.run) / "eval_ema.json").is_file():
        raise FlaxvisionError(
            f"{args.run} has no eval_ema.json (EMA weights): --weights ema needs a run trained with "
            "--ema-decay; drop --weights ema"
        )
    layout = args.format or model_layout(read_run(args.run)["model"]) or "flaxvision"
    card = model_card(args.run, layout=layout, repo_id=args.repo_id, weights=args.weights)
    if args.out is None:
        sys.stdout.write(card)
    else:
        write_atomic(args.out, card)
        print(f"flaxvision: wrote the model card to {args.out}", file=sys.stderr)
    return 0
