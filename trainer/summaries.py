"""TensorBoard writers and what goes into them: scalars, a sample-image grid, the config."""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")  # no display; figures become PNG summaries
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class Summaries:
    """`train` and `eval` writers under model_dir (or no-op writers on non-chief workers)."""

    def __init__(self, model_dir: str | None):
        if model_dir is None:
            self.train = self.eval = tf.summary.create_noop_writer()
        else:
            self.train = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
            self.eval = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))

    def scalars(self, writer, step: int, values: dict[str, float], prefix: str) -> None:
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"{prefix}/{name}", value)

    def text(self, writer, step: int, name: str, markdown: str) -> None:
        with writer.as_default(step=step):
            tf.summary.text(name, markdown)

    def image(self, writer, step: int, name: str, png: bytes) -> None:
        with writer.as_default(step=step):
            tf.summary.image(name, tf.expand_dims(tf.io.decode_png(png, channels=4), 0))

    def flush(self) -> None:
        self.train.flush()
        self.eval.flush()


def figure_to_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def image_grid(images: np.ndarray, titles: list[str], columns: int = 3) -> bytes:
    """A grid of uint8 images titled with their class names, as PNG bytes."""
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    figure.tight_layout()
    return figure_to_png(figure)


def markdown_table(rows: dict[str, object]) -> str:
    lines = ["| name | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in rows.items()]
    return "\n".join(lines)
