"""Figures for TensorBoard and reports, as PNG bytes: a grid of training images, the confusion
matrix, a gallery of misclassified images."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure


def _subplots(*grid, figsize, **options):
    """(figure, axes) of a figure outside pyplot: no backend is chosen for the process (a
    notebook keeps its inline plots) and nothing needs closing."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **options)


def figure_to_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def image_grid(images: np.ndarray, titles: list[str], columns: int = 3) -> bytes:
    """A grid of uint8 images titled with their class names, as PNG bytes."""
    rows = -(-len(images) // columns)
    figure, axes = _subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    figure.tight_layout()
    return figure_to_png(figure)


def confusion_figure(confusion: np.ndarray, class_names: list[str]) -> bytes:
    """The confusion matrix as a PNG: rows true, columns predicted, counts written in the cells
    when there are few classes."""
    n = len(class_names)
    size = min(max(5.0, 0.45 * n + 2), 24.0)
    figure, ax = _subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 60:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    if n <= 30:
        threshold = confusion.max() / 2 if confusion.size else 0
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if confusion[i, j] > threshold else "black")
    ax.set_title(f"confusion matrix ({int(confusion.sum())} images)")
    figure.tight_layout()
    return figure_to_png(figure)


def misclassified_gallery(predictions, class_names: list[str],
                          columns: int = 6) -> bytes:
    """Misclassified images titled with true and predicted names and the predicted probability."""
    count = len(predictions.gallery_index)
    columns = min(columns, max(1, count))
    rows = -(-count // columns)
    figure, axes = _subplots(rows, columns, figsize=(2.3 * columns, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    probabilities = predictions.probabilities
    for ax, index, image in zip(axes.flat, predictions.gallery_index, predictions.gallery_images):
        guess = int(np.argmax(predictions.logits[index]))
        ax.imshow(image)
        ax.set_title(f"true: {class_names[predictions.labels[index]]}\n"
                     f"pred: {class_names[guess]} ({probabilities[index, guess]:.2f})", fontsize=7)
    figure.tight_layout()
    return figure_to_png(figure)


def reliability_diagram(before, after, title: str) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling
    (trainer/tools/calibration.py's Reliability); the diagonal is perfect calibration."""
    figure, axes = _subplots(1, 2, figsize=(8, 4), sharey=True)
    for ax, reliability, name in ((axes[0], before, "before"), (axes[1], after, "after")):
        bins = len(reliability.count)
        centres = (np.arange(bins) + 0.5) / bins
        used = reliability.count > 0
        ax.bar(centres[used], reliability.accuracy[used], width=1 / bins, edgecolor="black",
               alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.plot(reliability.confidence[used], reliability.accuracy[used], "o", color="C3",
                markersize=3, label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_title(f"{name}: ECE {reliability.ece:.4f}", fontsize=10)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_to_png(figure)
