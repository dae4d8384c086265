"""Training: recipes (TrainConfig), the loop (`fit`), and the pieces it is made of.

    >>> from flaxvision.train import TrainConfig, fit
    >>> result = fit(TrainConfig(dataset="builtin:digits", ...), run_dir="runs/x")

Modules: `config` (TrainConfig), `recipe` (model + loaders from a recipe), `rundir` (the run directory: lock, files,
checks, export), `trainer` (mesh, sharded state, compiled steps), `step` (the jitted step functions), `optim`
(optimizers, schedules, freezing), `checkpoint` (Orbax run state, `Progress`), `evaluation`, `session` (the epoch
loop), `loop` (`fit`).
"""

from flaxvision.errors import TrainingDiverged, TrainingInterrupted
from flaxvision.train.checkpoint import Checkpointer, Progress
from flaxvision.train.config import TrainConfig
from flaxvision.train.evaluation import Evaluator
from flaxvision.train.loop import FitResult, fit
from flaxvision.train.optim import learning_rate_schedule, make_optimizer, trainable_filter
from flaxvision.train.recipe import build_run
from flaxvision.train.rundir import RunDirectory
from flaxvision.train.step import TrainState, cross_entropy, make_eval_step, make_train_step
from flaxvision.train.trainer import Trainer, out_of_memory_error

__all__ = [
    "Checkpointer", "Evaluator", "FitResult", "Progress", "RunDirectory", "TrainConfig", "TrainState", "Trainer",
    "TrainingDiverged", "TrainingInterrupted", "build_run", "cross_entropy", "fit", "learning_rate_schedule",
    "make_eval_step", "make_optimizer", "make_train_step", "out_of_memory_error", "trainable_filter",
]  # fmt: skip
