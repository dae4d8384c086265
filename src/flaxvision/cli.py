"""The `flaxvision` command: thin argument parsing over the library, errors turned into one-line messages.

Exit codes (one table, `EXIT_CODES`): 0 success, 1 a check that ran and failed or a run that diverged or lost a
peer, 2 bad input (unknown model, bad value, unreadable file, a run directory in the wrong state), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from flaxvision import __version__, compile_cache, host_memory
from flaxvision.commands import COMMANDS
from flaxvision.errors import FlaxvisionError, PeerProcessLost, RunStopped, TrainingDiverged, TrainingInterrupted

EXIT_BAD_INPUT = 2
# Error class -> exit code; the first match wins (subclasses before their bases).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (TrainingInterrupted, 130),
    (TrainingDiverged, 1),
    (PeerProcessLost, 1),
    (RunStopped, 1),
    (FlaxvisionError, EXIT_BAD_INPUT),
    (KeyboardInterrupt, 130),
)


def exit_code_of(err: BaseException) -> int:
    """The exit code for an error the CLI reports on one line."""
    return next(code for kind, code in EXIT_CODES if isinstance(err, kind))

# Commands whose time goes into XLA:CPU steps, which gain from huge pages (flaxvision.host_memory).
COMPUTE_COMMANDS = ("train", "evaluate", "bench")
# Commands that use JAX's persistent compilation cache by default (not `bench`: it measures compilation).
CACHED_COMMANDS = ("train", "evaluate", "predict", "serve", "export", "report")


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line and a pointer to --help, not the whole usage (train alone has 60 options)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flaxvision",
        description="Build, import, fine-tune, evaluate and ship image classifiers with JAX + Flax NNX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flaxvision {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile everything afresh (default: JAX's persistent cache in ~/.cache/flaxvision/jax-cache, "
                             "or $FLAXVISION_COMPILE_CACHE)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the console script or `python -m flaxvision`, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    cache = "--no-compile-cache" not in argv  # (likewise)
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a not in ("--debug", "--no-compile-cache")])
    args.debug = debug
    if as_program and args.command in COMPUTE_COMMANDS:
        host_memory.restart_with_huge_pages()
    if args.command in CACHED_COMMANDS:
        compile_cache.configure(enabled=cache)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (FlaxvisionError, RunStopped) as err:
        if args.debug:
            raise
        print(f"flaxvision: error: {err}", file=sys.stderr, flush=True)
        if getattr(err, "hard_exit", False):  # a multi-process run that lost a peer (see commands/train.py)
            sys.stdout.flush()
            os._exit(exit_code_of(err))
        return exit_code_of(err)
    except KeyboardInterrupt as err:
        print("flaxvision: interrupted", file=sys.stderr)
        return exit_code_of(err)


if __name__ == "__main__":
    sys.exit(main())
