"""Classification metrics from logits and labels on the host: per-class precision / recall / F1, calibration.

    report = classification_report(confusion)        # per class, macro and weighted averages (as scikit-learn's)
    ece = expected_calibration_error(probs, labels)  # 15 equal-width confidence bins
    t = fit_temperature(logits, labels)              # the softmax temperature with the least NLL

Written with numpy (and scipy's scalar minimiser for the temperature) because these are a few array reductions
over the logits of one evaluation; scikit-learn's definitions are followed exactly where it has them (tests compare).
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels (the cross-entropy), at a softmax temperature."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of the squared distance between the probabilities and the one-hot label (0 is perfect,
    2 the worst)."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """The top-1 confidences in `bins` equal-width bins over (0, 1]: per bin the example count, the accuracy and the
    mean confidence (0 for an empty bin); what ECE averages and the reliability diagram draws."""
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (k/B, (k+1)/B] -> bin k
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    return {"count": count, "accuracy": np.bincount(which, weights=correct, minlength=bins) / safe,
            "confidence": np.bincount(which, weights=confidence, minlength=bins) / safe}  # fmt: skip


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the mean over examples of |accuracy - mean confidence| of their confidence bin (Guo et al. 2017)."""
    b = calibration_bins(probs, labels, bins)
    return float(np.sum(b["count"] * np.abs(b["accuracy"] - b["confidence"])) / len(labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature T in [0.05, 20] that minimises the NLL of the labels (searched over log T)."""
    from scipy.optimize import minimize_scalar  # (scipy comes with scikit-learn, a dependency)

    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(np.log(0.05), np.log(20.0)),
                            method="bounded", options={"xatol": 1e-4})  # fmt: skip
    return float(np.exp(found.x))


def classification_report(confusion: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix (true x predicted), and their macro and
    support-weighted averages over the classes that have images; 0 where a ratio has nothing to divide (as
    scikit-learn's classification_report with zero_division=0)."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    # Averages over the classes present in the labels or the predictions (scikit-learn's label set).
    present = (support > 0) | (predicted > 0)
    weights = support[present] / support.sum()

    def average(values: np.ndarray) -> dict[str, float]:
        return {"macro": float(values[present].mean()), "weighted": float(np.sum(values[present] * weights))}

    per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(names, precision, recall, f1, support)}  # fmt: skip
    p_avg, r_avg, f_avg = average(precision), average(recall), average(f1)
    return {
        "per_class": per_class,
        "macro_avg": {"precision": p_avg["macro"], "recall": r_avg["macro"], "f1": f_avg["macro"]},
        "weighted_avg": {"precision": p_avg["weighted"], "recall": r_avg["weighted"], "f1": f_avg["weighted"]},
    }


def calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NLL, Brier score and ECE of the logits, and the same after fitting a softmax temperature on them."""
    probs = softmax(logits)
    temperature = fit_temperature(logits, labels)
    scaled = softmax(logits, temperature)
    return {
        "nll": nll(logits, labels), "brier": brier_score(probs, labels), "ece": expected_calibration_error(probs, labels),
        "temperature": temperature, "nll_after_temperature": nll(logits, labels, temperature),
        "ece_after_temperature": expected_calibration_error(scaled, labels),
    }  # fmt: skip
