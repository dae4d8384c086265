"""The `flaxvision` command: thin argument parsing over the library, errors turned into one-line messages.

Exit codes: 0 success, 1 a check that ran and failed, 2 bad input (unknown model, bad value, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from flaxvision import __version__
from flaxvision.errors import FlaxvisionError

EXIT_BAD_INPUT = 2


def _cmd_models(args: argparse.Namespace) -> int:
    from flaxvision.models import list_models, model_info

    rows = [model_info(name) for name in list_models(args.pattern)]
    if args.pattern and not rows:
        raise FlaxvisionError(f"no model matches {args.pattern!r}; run `flaxvision models` to list them all")
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "params", "gflops", "img_size")} for r in rows], indent=2))
        return 0
    header = f"{'name':<24} {'params (M)':>10} {'GFLOPs':>8} {'img_size':>8}  description"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<24} {r['params'] / 1e6:>10.2f} {r['gflops']:>8.3f} {r['img_size']:>8}  {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flaxvision",
        description="Build, import, fine-tune, evaluate and ship image classifiers with JAX + Flax NNX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flaxvision {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = sub.add_parser(
        "models",
        help="list the model zoo",
        description="List registered models: parameters, forward GFLOPs at the default size, default image size.",
        epilog="examples:\n  flaxvision models\n  flaxvision models 'vit_*_patch16_*'\n  flaxvision models --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.add_argument("pattern", nargs="?", help="shell-style wildcard on the name, e.g. 'vit_*'")
    models.add_argument("--json", action="store_true", help="print a JSON list of {name, params, gflops, img_size}")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except FlaxvisionError as err:
        if args.debug:
            raise
        print(f"flaxvision: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("flaxvision: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
