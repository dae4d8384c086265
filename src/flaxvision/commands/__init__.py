"""One module per `flaxvision` subcommand. Each has `add_parser(subparsers)`, which sets `func` to its runner.

Runners import the heavy parts of the library (jax, datasets, ...) lazily, so `flaxvision --help` stays fast.
"""

from flaxvision.commands import bench, evaluate, export, models, predict, presets, report, serve, train, verify

# Order = order in `flaxvision --help`.
COMMANDS = [train, evaluate, predict, report, export, serve, verify, presets, models, bench]
