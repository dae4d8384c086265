"""Evaluation: the summed eval step over every (padded) batch of a split, read from the device once at the end.

    result = Evaluator(model, batch_size=64).evaluate(loader)     # a trained model alone (no optimizer)
    result = trainer.evaluate(loader)                              # during training, with the trainer's state

Batches go through the model's `DeviceStage` (padding to one shape, transfer, normalisation), so evaluation sees
exactly the inputs training and `predict` see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvision import host_memory
from flaxvision.data.device import DeviceStage
from flaxvision.errors import FlaxvisionError
from flaxvision.train.step import make_eval_step, split_model


def run_evaluation(eval_step: Callable, state: Any, batches: Iterable, batch_size: int, stage: DeviceStage) -> dict[str, Any]:
    """Sum `eval_step` over every batch on the device; read the totals once at the end.

    `batch_size` is the global batch: each process pads its own batches to its share of it. With several
    processes every one must yield the same number of batches (flaxvision loaders do: the last global batch is
    padded with masked rows), each covering its own examples, so the sums cover the data exactly once.
    """
    totals = None
    for batch, _ in stage.prefetch((stage.pad(b, batch_size), None) for b in batches):
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise FlaxvisionError("the validation data yielded no batches; check the validation split and --max-val-samples")
    return summarize(jax.device_get(totals))


def summarize(totals: dict[str, Any]) -> dict[str, Any]:
    """The eval step's sums -> val_loss, val_accuracy, val_top5_accuracy, val_count, per-class accuracy, confusion."""
    count = int(totals["count"])
    if count == 0:
        raise FlaxvisionError("the validation data holds no usable image (every one was skipped or masked)")
    confusion = np.asarray(totals["confusion"])
    support = confusion.sum(1)
    per_class = np.divide(np.diag(confusion), support, out=np.full(len(confusion), np.nan), where=support > 0)
    return {
        "val_loss": float(totals["loss_sum"]) / count,
        "val_accuracy": int(totals["correct"]) / count,
        "val_top5_accuracy": int(totals["correct5"]) / count,
        "val_count": count,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


class Evaluator:
    """Evaluation alone (no optimizer): the eval step of a trained model, sharded over the local devices."""

    def __init__(self, model: Any, *, batch_size: int, preprocess: Callable | None = None, devices: list | None = None):
        host_memory.trim_after_compiles()
        self.stage = DeviceStage(model.preprocessing, devices=devices, dtype=model.config.dtype,
                                 preprocess=preprocess)  # fmt: skip
        if batch_size % self.stage.device_count:
            raise FlaxvisionError(f"batch size {batch_size} does not divide by the {self.stage.device_count} devices; "
                                  f"use a multiple of {self.stage.device_count}")  # fmt: skip
        self.batch_size = batch_size
        parts, state = split_model(model, nnx.Param)
        self.parts = parts
        self.state = self.stage.put_replicated(state)
        self.eval_step = jax.jit(make_eval_step(parts, preprocess=self.stage.eval_inputs, num_classes=model.config.num_classes))

    def evaluate(self, batches: Iterable) -> dict[str, Any]:
        return run_evaluation(self.eval_step, self.state, batches, self.batch_size, self.stage)

    def logits(self, batches: Iterable, *, tta: str | None = None,
               on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(float32 logits (N, classes), int labels (N,)) of every valid example, on the host (this process's rows).

        `tta="hflip"` averages the logits of each image and its mirror image. `on_batch(images, logits, labels)`
        sees each batch's valid rows, images included (the report keeps its worst mistakes so).
        """
        from flaxvision.train.step import merge_model

        if tta not in (None, "hflip"):
            raise FlaxvisionError(f"--tta {tta!r}: the test-time augmentation flaxvision has is hflip")

        def forward(state, images):
            model = merge_model(self.parts, state, train=False)
            x = self.stage.eval_inputs(images)
            out = model(x).astype(jnp.float32)
            return (out + model(x[:, :, ::-1, :]).astype(jnp.float32)) / 2 if tta == "hflip" else out

        step = jax.jit(forward)
        kept_logits, kept_labels = [], []
        for batch, _ in self.stage.prefetch((self.stage.pad(b, self.batch_size), None) for b in batches):
            mask = np.asarray(jax.device_get(batch["mask"])).astype(bool)
            kept_logits.append(np.asarray(jax.device_get(step(self.state, batch["image"])))[mask])
            kept_labels.append(np.asarray(jax.device_get(batch["label"]))[mask].astype(np.int64))
            if on_batch is not None and mask.any():
                on_batch(np.asarray(jax.device_get(batch["image"]))[mask], kept_logits[-1], kept_labels[-1])
        if not kept_labels or not sum(len(x) for x in kept_labels):
            raise FlaxvisionError("the validation data holds no usable image (every one was skipped or masked)")
        return np.concatenate(kept_logits), np.concatenate(kept_labels)
