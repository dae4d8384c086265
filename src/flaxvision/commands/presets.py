"""`flaxvision presets`: the recipes, what they do, and the result their sources report."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "presets", help="list the training recipes",
        description="Recipes for `flaxvision train --preset NAME`, with the result their sources report.",
        epilog="examples:\n  flaxvision presets\n  flaxvision presets --json", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print [{name, description, expected, command}]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flaxvision.presets import DEFAULT_PRESET, list_presets, preset_module

    rows = []
    for name in list_presets():
        module = preset_module(name)
        command = "flaxvision train" + ("" if name == DEFAULT_PRESET else f" --preset {name}")
        rows.append({"name": name, "description": module.DESCRIPTION, "expected": module.EXPECTED, "command": command,
                     "default": name == DEFAULT_PRESET})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        marker = " (default)" if r["default"] else ""
        print(f"{r['name']:<{width}}  {r['description']}{marker}\n{'':<{width}}  expected: {r['expected']}")
    return 0
