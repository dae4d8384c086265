"""Training: recipes (TrainConfig), optimisers, the jitted steps, Orbax checkpoints and the loop."""

from flaxvision.train.checkpoint import Checkpointer
from flaxvision.train.config import TrainConfig
from flaxvision.train.loop import FitResult, Trainer, TrainingDiverged, TrainingInterrupted, fit
from flaxvision.train.optim import learning_rate_schedule, make_optimizer, trainable_filter
from flaxvision.train.step import TrainState, cross_entropy, make_eval_step, make_train_step, normalize

__all__ = [
    "Checkpointer", "FitResult", "TrainConfig", "TrainState", "Trainer", "TrainingDiverged", "TrainingInterrupted",
    "cross_entropy", "fit", "learning_rate_schedule", "make_eval_step", "make_optimizer", "make_train_step",
    "normalize", "trainable_filter",
]  # fmt: skip
