"""The two families of errors flaxvision raises; the CLI maps each class to an exit code in one table (cli.py).

* `FlaxvisionError` (a `ValueError`): bad input, that is what the user asked for or gave: a model name, a config
  value, a file, a dataset, a run directory in the wrong state, a disk that refused a write. Its message is one
  line: what went wrong, with which value, and what to do. The CLI prints it and exits with 2.
* `RunStopped`: a run that was going fine and stopped: it diverged, it was interrupted, a peer process died. Not a
  `ValueError`, and not a `FlaxvisionError`: nothing the user passed was wrong, and the run can be resumed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlaxvisionError(ValueError):
    """A problem with the user's input (model name, config value, file, dataset, run directory ...)."""


class ConfigError(FlaxvisionError):
    """A configuration value that the model or recipe cannot use."""


class RunStopped(Exception):
    """A run stopped before its end; the message says where it stands and how to continue."""


class TrainingDiverged(RunStopped):
    """The loss or the gradients became NaN or Inf; the last good checkpoint is intact."""


class TrainingInterrupted(RunStopped):
    """Ctrl-C: a checkpoint was saved; the message says how to resume."""


class PeerProcessLost(RunStopped):
    """Another process of a multi-process run died or became unreachable; the run stopped everywhere."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean a, b?)' for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
