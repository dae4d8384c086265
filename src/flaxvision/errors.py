"""Errors a person can act on.

Every error that flaxvision raises because of what the user asked for derives from `FlaxvisionError`. Its
message is one line: what went wrong, with which value, and what to do. The CLI prints it and exits with code 2
(no traceback unless --debug). It subclasses ValueError so library callers can catch the usual type.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlaxvisionError(ValueError):
    """A problem with the user's input (model name, config value, file, dataset ...)."""

    exit_code = 2  # what the CLI exits with; subclasses for runs that stopped (diverged, interrupted) differ


class ConfigError(FlaxvisionError):
    """A configuration value that the model or recipe cannot use."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean a, b?)' for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
