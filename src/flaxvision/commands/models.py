"""`flaxvision models`: the model zoo as a table or JSON."""

from __future__ import annotations

import argparse
import json

from flaxvision.errors import FlaxvisionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "models",
        help="list the model zoo",
        description="List registered models: parameters, forward GFLOPs at the default size, default image size.",
        epilog="examples:\n  flaxvision models\n  flaxvision models 'vit_*_patch16_*'\n  flaxvision models --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pattern", nargs="?", help="shell-style wildcard on the name, e.g. 'vit_*'")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {name, params, gflops, img_size}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
