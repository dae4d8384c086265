"""One module per `flaxvision` subcommand. Each has `add_parser(subparsers)`, which sets `func` to its runner.

Runners import the heavy parts of the library (jax, datasets, ...) lazily, so `flaxvision --help` stays fast.
"""

from flaxvision.commands import (
    bench,
    card,
    compare,
    data,
    evaluate,
    export,
    models,
    predict,
    presets,
    push,
    report,
    serve,
    train,
    verify,
)

# Order = order in `flaxvision --help`.
COMMANDS = [train, evaluate, predict, report, compare, export, serve, push, card, verify, presets, models, data, bench]
