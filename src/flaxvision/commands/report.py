"""`flaxvision report`: redraw a run's plots and report.html from metrics.jsonl and its exported model."""

from __future__ import annotations

import argparse
from pathlib import Path

from flaxvision.errors import FlaxvisionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="(re)generate a run's plots and report.html",
        description="Draw the learning-rate schedule, loss and accuracy curves, sample and prediction grids and the "
        "confusion matrix of a run into PNG files and a self-contained report.html.",
        epilog="examples:\n  flaxvision report runs/digits-vit-20261122-101500", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run", metavar="RUN_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flaxvision.report import write_report
    from flaxvision.train.recipe import report_inputs

    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise FlaxvisionError(f"{args.run} is not a flaxvision run directory (no metrics.jsonl); pass the run's directory")
    path = write_report(args.run, **report_inputs(args.run))
    print(f"flaxvision: wrote {path}")
    return 0
