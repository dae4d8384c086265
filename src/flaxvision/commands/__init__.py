"""One module per `flaxvision` subcommand. Each has `add_parser(subparsers)`, which sets `func` to its runner.

Runners import the heavy parts of the library (jax, datasets, ...) lazily, so `flaxvision --help` stays fast.
"""

from flaxvision.commands import models, verify
from flaxvision.commands import bench

from flaxvision.commands import evaluate, export, predict, presets, report, train

# Order = order in `flaxvision --help`.
COMMANDS = [train, evaluate, predict, report, export, presets, models, verify]
COMMANDS += [bench]
