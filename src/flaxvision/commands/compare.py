"""`flaxvision compare`: several runs' curves, recipe differences and final metrics on one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  flaxvision compare runs/food-adamw runs/food-sgd runs/food-lora --out compare/food
  flaxvision compare runs/digits-vit-* --out /tmp/digits"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare", help="compare runs on one HTML page", epilog=EPILOG,
        description="Overlay the runs' training and validation curves (per epoch), list the recipe fields that "
        "differ between them and put their final metrics side by side, in DIR/compare.html (self-contained: "
        "opens offline). Unfinished runs are shown up to their last evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where compare.html goes (created)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flaxvision.report.compare import write_compare

    print(f"flaxvision: wrote {write_compare(args.runs, args.out)}")
    return 0
