"""The run's pictures, each a function from plain data to a PNG file (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flaxvision import files  # noqa: E402

GREEN, RED = "#1a7f37", "#cf222e"
# Class and run names are shown as written: a "$" in one is not TeX (an unbalanced "$\frac{" would raise when drawn).
literal_text = matplotlib.rc_context({"text.parse_math": False})


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return files.write_atomic(path, png.getvalue())


def lr_schedule(steps: np.ndarray, lrs: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, lrs, color="#0969da")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def train_loss(steps: Sequence[int], losses: Sequence[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, losses, color="#8250df", marker="." if len(steps) < 40 else None)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def val_curves(epochs: Sequence[float], losses: Sequence[float], accuracies: Sequence[float], path: Path, *,
               ema: tuple[Sequence[float], Sequence[float]] | None = None) -> Path:  # fmt: skip
    """Validation loss and top-1 per epoch; `ema` = (losses, accuracies) of the EMA weights, drawn beside them."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, losses, marker="o", color="#bf3989", label="raw weights")
    left.set(xlabel="epoch", ylabel="validation loss", title="Validation loss")
    right.plot(epochs, np.asarray(accuracies) * 100, marker="o", color=GREEN, label="raw weights")
    right.set(xlabel="epoch", ylabel="top-1 (%)", title="Validation accuracy")
    if ema is not None:
        left.plot(epochs, ema[0], marker="s", linestyle="--", color="#444444", label="EMA")
        right.plot(epochs, np.asarray(ema[1]) * 100, marker="s", linestyle="--", color="#444444", label="EMA")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ema is not None:
            ax.legend()
    return _save(fig, path)


@literal_text
def confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    confusion = np.asarray(confusion)
    n = len(confusion)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    side = min(2.5 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    names = [str(c)[:18] for c in class_names] if len(class_names) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (validation)")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    color = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7, color=color)
    return _save(fig, path)


def _grid_shape(count: int) -> tuple[int, int]:
    cols = min(count, 8)
    return int(np.ceil(count / cols)), cols


def _show(ax, image: np.ndarray) -> None:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


@literal_text
def image_grid(images: np.ndarray, titles: Sequence[str], title: str, path: Path) -> Path:
    """uint8 images (N, H, W, C) with a caption each."""
    rows, cols = _grid_shape(len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles):
        ax.axis("on")
        _show(ax, image)
        ax.set_title(caption[:20], fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


@literal_text
def prediction_grid(
    images: np.ndarray, true: Sequence[str], predicted: Sequence[str], probabilities: Sequence[float], path: Path, *,
    title: str = "Predictions on validation images",
) -> Path:
    """Validation images captioned expected vs predicted with probability; green when right, red when wrong."""
    rows, cols = _grid_shape(len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.5 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, prob in zip(axes.flat, images, true, predicted, probabilities):
        ax.axis("on")
        _show(ax, image)
        right = t == p
        ax.set_title(f"true: {t[:14]}\npred: {p[:14]} ({prob:.0%})", fontsize=7, color=GREEN if right else RED)
        for spine in ax.spines.values():
            spine.set_edgecolor(GREEN if right else RED)
            spine.set_linewidth(2.5)
    fig.suptitle(f"{title} (green: right, red: wrong)")
    return _save(fig, path)


def reliability_diagram(bins: dict[str, np.ndarray], ece: float, path: Path) -> Path:
    """Accuracy against confidence per confidence bin (flaxvision.metrics.calibration_bins), with the diagonal of
    perfect calibration and the gap drawn; beside it how many images each bin holds."""
    count, accuracy, confidence = (np.asarray(bins[k]) for k in ("count", "accuracy", "confidence"))
    n = len(count)
    edges = np.linspace(0, 1, n + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / n
    used = count > 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot([0, 1], [0, 1], linestyle="--", color="#59636e", label="perfect calibration")
    left.bar(centres[used], accuracy[used], width=width, color="#0969da", edgecolor="white", label="accuracy")
    left.bar(centres[used], confidence[used] - accuracy[used], bottom=accuracy[used], width=width, color=RED,
             alpha=0.35, edgecolor=RED, label="gap to confidence")  # fmt: skip
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
             title=f"Reliability diagram (ECE {ece:.3f}, {n} bins)")  # fmt: skip
    left.legend(loc="upper left", fontsize=8)
    right.bar(centres, count, width=width, color="#8250df", edgecolor="white")
    right.set(xlim=(0, 1), xlabel="confidence", ylabel="images", title="Images per confidence bin")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)



@literal_text
def overlaid(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str,
             path: Path) -> Path:  # fmt: skip
    """Several runs' curves on one axis: (label, xs, ys) each, a colour and a marker style each."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, xs, ys) in enumerate(series):
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 40 else None, markersize=3, linestyle=("-", "--", ":", "-.")[i // 10 % 4])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    lines = ax.get_lines()  # labels given, so that a run named "_x" is not left out of the legend as matplotlib's
    ax.legend(lines, [label for label, _, _ in series], fontsize=8)  # "no legend" marker would
    return _save(fig, path)
