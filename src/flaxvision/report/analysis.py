"""What the report shows about a trained model's answers: one pass over the validation data for its logits, the
most confident mistakes (kept with their images), per-class metrics and explanation overlays.

    found = validation_pass(model, stage, val_loader, keep=8)   # logits, labels, the worst mistakes' images
    rows = per_class_rows(confusion, class_names)              # precision / recall / F1 / support, worst F1 first

The pass is the evaluator's (flaxvision.train.evaluation.Evaluator.logits: compiled, padded batches, masked rows
left out) and holds only the logits plus `keep` images on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flaxvision import metrics
from flaxvision.errors import FlaxvisionError


@dataclasses.dataclass
class ValidationPass:
    logits: np.ndarray  # (N, classes) float32
    labels: np.ndarray  # (N,) int
    mistake_images: np.ndarray  # (K, H, W, C) uint8: the K wrong answers given with the highest probability
    mistake_labels: np.ndarray  # (K,) their true class
    mistake_predictions: np.ndarray  # (K,) what the model said
    mistake_probabilities: np.ndarray  # (K,) with which probability

    @property
    def probabilities(self) -> np.ndarray:
        return metrics.softmax(self.logits)


def _batch_size(loader: Any) -> int:
    """Rows per batch: a flaxvision loader says it; for other re-iterable batch lists, the first batch's."""
    size = getattr(loader, "batch_size", None)
    if size:
        return int(size)
    first = next(iter(loader), None)
    if first is None:
        raise FlaxvisionError("the validation data yielded no batches")
    return len(first[1] if isinstance(first, (tuple, list)) else first["label"])


def validation_pass(model: Any, stage: Any, loader: Any, *, keep: int = 8) -> ValidationPass:
    """The logits of every valid example of `loader` (flaxvision.train.evaluation.Evaluator, on one device, with
    the stage's own preprocessing if it has one), and the `keep` most confident mistakes with their images."""
    import jax

    from flaxvision.train.evaluation import Evaluator

    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    evaluator = Evaluator(model, batch_size=_batch_size(loader), preprocess=getattr(stage, "custom", None),
                          devices=jax.devices()[:1])  # fmt: skip
    worst: dict[str, np.ndarray] = {"image": np.zeros((0, 1, 1, 3), np.uint8), "label": np.zeros(0, np.int64),
                                    "pred": np.zeros(0, np.int64), "prob": np.zeros(0)}  # fmt: skip

    def keep_worst(images: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> None:
        nonlocal worst
        probs = metrics.softmax(logits)
        wrong = probs.argmax(-1) != labels
        if not wrong.any() or images.dtype != np.uint8:
            return
        found = {"image": images[wrong], "label": labels[wrong], "pred": probs.argmax(-1)[wrong], "prob": probs.max(-1)[wrong]}
        if len(worst["label"]):
            found = {k: np.concatenate([worst[k], found[k]]) for k in found}
        order = np.argsort(-found["prob"], kind="stable")[:keep]
        worst = {k: v[order].copy() for k, v in found.items()}

    logits, labels = evaluator.logits(loader, on_batch=keep_worst)
    return ValidationPass(logits, labels, worst["image"], worst["label"], worst["pred"], worst["prob"])


def confusion_of(found: ValidationPass, classes: int) -> np.ndarray:
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (found.labels, found.logits.argmax(-1)), 1)
    return confusion


def per_class_rows(confusion: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """One row per class: name, precision, recall, F1, support (scikit-learn's definitions); lowest F1 first, so the
    classes that need attention lead the table."""
    report = metrics.classification_report(confusion, names)
    rows = [{"class": name, **values} for name, values in report["per_class"].items()]
    rows.sort(key=lambda r: (r["support"] == 0, r["f1"], r["class"]))
    return rows


def explanations(model: Any, stage: Any, images: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(method, predicted class per image, overlays uint8 (N, H, W, 3)) for uint8 images: attention rollout for a
    ViT, Grad-CAM for a CNN (flaxvision.explain)."""
    import jax.numpy as jnp

    from flaxvision import explain

    method = explain.method_for(model)
    model.eval()
    inputs = stage.eval_inputs(jnp.asarray(images))
    predicted = np.asarray(model(inputs)).argmax(-1)
    heat = explain.explain(model, inputs, method, targets=predicted)
    return method, predicted, explain.overlay(images, heat)
