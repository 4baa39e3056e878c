"""Evaluation of a model on a split, beyond the trainer's running metrics: per-image
predictions, loss, top-1/top-5, a confusion matrix, per-class precision and recall, and figures.

Reusable by the trainer and the `trainer.evaluate` tool:

    predictions = predict_split(model, files, labels, image_size=S, batch_size=B)
    report = make_report(predictions, class_names, split="test", step=N)
    paths = write_report(report, predictions, output_dir, writer=tf.summary writer or None)

The images come from data.datasets.eval_dataset (every image once; weight-0 padding dropped) with
the run's --eval_crop, so the pixels are exactly those of the trainer's evaluation and of the
exported model (data.decode.decode_for_eval).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import numpy as np
import tensorflow as tf

from data import datasets
from data.files import atomic_write_text
from data.spec import InputSpec
from trainer.report import figures

TOP_K = 5
GALLERY_SIZE = 24  # misclassified images kept for the gallery figure


@dataclasses.dataclass
class Predictions:
    """Logits for every image of a split, in file order, and a few misclassified images."""
    files: list[str]  # [] from the trainer's distributed pass (its order: trainer/loop/step.py)
    labels: np.ndarray  # [N] int
    logits: np.ndarray  # [N, C] float32
    gallery_index: np.ndarray  # [M] indices into logits (and files) of `gallery_images`
    gallery_images: np.ndarray  # [M, S, S, 3] uint8, misclassified, first M in file order

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.logits, axis=1)

    @property
    def probabilities(self) -> np.ndarray:
        shifted = self.logits.astype(np.float64) - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


def tta_logits(model, images, tta: str = "none"):
    """The model's float32 logits for a batch; with tta="flip" the log of the mean softmax of
    the image and its mirror (test-time augmentation: log-probabilities are logits too)."""
    logits = tf.cast(model(images, training=False), tf.float32)
    if tta == "none":
        return logits
    flipped = tf.cast(model(tf.reverse(images, axis=[2]), training=False), tf.float32)
    return tf.math.log((tf.nn.softmax(logits) + tf.nn.softmax(flipped)) / 2.0)


def inference_function(model, tta: str = "none"):
    """A tf.function of `tta_logits`: make it once and pass it to every `predict_split` over
    the same model, so that it is traced once per batch shape rather than once per call."""
    return tf.function(lambda images: tta_logits(model, images, tta))


def predict_split(model, files, labels, *, image_size: int, batch_size: int,
                  gallery_size: int = GALLERY_SIZE, dataset=None, tta: str = "none",
                  eval_crop: float = 1.0, infer=None) -> Predictions:
    """Runs `model` (inference mode) once over every file (twice with tta="flip": see
    `tta_logits`); keeps up to `gallery_size` misclassified images for the gallery. `dataset`:
    the split's eval_dataset (e.g. from packed data, data/source.py); default: read `files`
    with the evaluation pixels of `eval_crop` (data.decode.decode_for_eval). `infer`: an
    `inference_function(model, tta)` to reuse (default: a new one)."""
    files, labels = list(files), np.asarray(labels, np.int64)
    if dataset is None:
        dataset = datasets.eval_dataset(files, labels.tolist(), InputSpec(
            image_size, batch_size, eval_cache="none", eval_crop=eval_crop))
    infer = infer or inference_function(model, tta)
    logits, gallery_index, gallery_images = [], [], []
    seen = 0
    for images, batch_labels, weights in dataset:
        batch_logits = infer(images).numpy()
        keep = weights.numpy() > 0
        batch_logits = batch_logits[keep]
        wrong = np.flatnonzero(np.argmax(batch_logits, axis=1) != batch_labels.numpy()[keep])
        for i in wrong[:max(0, gallery_size - len(gallery_index))]:
            gallery_index.append(seen + i)
            gallery_images.append(images.numpy()[keep][i])
        logits.append(batch_logits)
        seen += len(batch_logits)
    assert seen == len(files), (seen, len(files))
    num_classes = int(model.outputs[0].shape[-1]) if getattr(model, "outputs", None) else None
    all_logits = np.concatenate(logits) if logits else np.zeros([0, num_classes or 0], np.float32)
    images_shape = [0, image_size, image_size, 3]
    return Predictions(files, labels, all_logits, np.asarray(gallery_index, np.int64),
                       np.stack(gallery_images) if gallery_images else np.zeros(images_shape,
                                                                                np.uint8))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes,
                                                                          num_classes)


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision (of the images predicted as the class, the share that are it) and recall (of
    the images of the class, the share predicted as it); NaN where undefined (0/0)."""
    correct = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, correct / predicted, np.nan)
        recall = np.where(support > 0, correct / support, np.nan)
    return {"precision": precision, "recall": recall, "support": support,
            "predicted": predicted, "correct": correct.astype(np.int64)}


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """As tf.math.in_top_k: the label is a hit when fewer than k classes score strictly higher."""
    label_logit = logits[np.arange(len(labels)), labels]
    return (logits > label_logit[:, None]).sum(axis=1) < k


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    log_sum = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return log_sum - z[np.arange(len(labels)), labels]


@dataclasses.dataclass
class Report:
    split: str
    step: int | None
    class_names: list[str]
    num_images: int
    loss: float
    accuracy: float
    top5_accuracy: float
    confusion: np.ndarray
    per_class: dict[str, np.ndarray]
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. checkpoint, data_dir

    @property
    def name(self) -> str:
        """<split>-step<N>, then -crop<F> when evaluated with another --eval_crop than the
        run's (`eval_crop` vs `run_eval_crop` in extra), then -tta-<kind>: another policy never
        overwrites the files of the run's own."""
        name = f"{self.split}-step{self.step}" if self.step is not None else self.split
        crop = self.extra.get("eval_crop")
        if crop is not None and crop != self.extra.get("run_eval_crop", crop):
            name += f"-crop{crop:g}"
        tta = self.extra.get("tta", "none")
        return name if tta == "none" else f"{name}-tta-{tta}"

    def to_json(self) -> dict:
        def number(x):
            return None if np.isnan(x) else float(x)
        rows = [{"class": name, "precision": number(self.per_class["precision"][i]),
                 "recall": number(self.per_class["recall"][i]),
                 "support": int(self.per_class["support"][i]),
                 "predicted": int(self.per_class["predicted"][i]),
                 "correct": int(self.per_class["correct"][i])}
                for i, name in enumerate(self.class_names)]
        return {"split": self.split, "step": self.step, **self.extra,
                "images": self.num_images, "loss": self.loss, "accuracy": self.accuracy,
                "top5_accuracy": self.top5_accuracy,
                # Means over the classes where each is defined (predicted at all / present).
                "macro_precision": _mean_defined(self.per_class["precision"]),
                "macro_recall": _mean_defined(self.per_class["recall"]),
                "per_class": rows}


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else None


def make_report(predictions: Predictions, class_names: list[str], *, split: str,
                step: int | None, **extra) -> Report:
    labels, logits = predictions.labels, predictions.logits
    n = len(labels)
    confusion = confusion_matrix(labels, predictions.predicted, len(class_names))
    k = min(TOP_K, len(class_names))
    return Report(
        split=split, step=step, class_names=list(class_names), num_images=n,
        loss=float(np.mean(cross_entropy(logits, labels))) if n else float("nan"),
        accuracy=float(np.trace(confusion) / n) if n else float("nan"),
        top5_accuracy=float(np.mean(top_k_hits(logits, labels, k))) if n else float("nan"),
        confusion=confusion, per_class=per_class_metrics(confusion), extra=extra)


# --- files -----------------------------------------------------------------------------------
def confusion_csv(confusion: np.ndarray, class_names: list[str]) -> str:
    """Rows are true classes, columns predicted classes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, confusion):
        writer.writerow([name, *map(int, row)])
    return out.getvalue()


def predictions_csv(predictions: Predictions, class_names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "true", "predicted", "probability", "correct"])
    probabilities = predictions.probabilities
    for i, (path, label, guess) in enumerate(zip(predictions.files, predictions.labels,
                                                 predictions.predicted)):
        writer.writerow([path, class_names[label], class_names[guess],
                         f"{probabilities[i, guess]:.6f}", int(label == guess)])
    return out.getvalue()


def write_report(report: Report, predictions: Predictions, output_dir: str,
                 writer=None) -> dict[str, str]:
    """<output_dir>/<split>-step<N>.json, -confusion.csv and -predictions.csv; with a summary
    writer also the confusion-matrix figure, the misclassified gallery and the per-class table
    as TensorBoard images/text under `<split>/`. Returns the paths written."""
    base = os.path.join(output_dir, report.name)
    paths = {"json": base + ".json", "confusion_csv": base + "-confusion.csv",
             "predictions_csv": base + "-predictions.csv"}
    atomic_write_text(paths["confusion_csv"],
                                  confusion_csv(report.confusion, report.class_names))
    atomic_write_text(paths["predictions_csv"],
                                  predictions_csv(predictions, report.class_names))
    document = report.to_json()
    document["files"] = {"confusion_csv": os.path.basename(paths["confusion_csv"]),
                         "predictions_csv": os.path.basename(paths["predictions_csv"])}
    atomic_write_text(paths["json"], json.dumps(document, indent=2))
    if writer is not None:
        step = report.step or 0
        with writer.as_default(step=step):
            tf.summary.image(f"{report.split}/confusion_matrix",
                             _png_batch(figures.confusion_figure(report.confusion, report.class_names)))
            if len(predictions.gallery_index):
                tf.summary.image(f"{report.split}/misclassified",
                                 _png_batch(figures.misclassified_gallery(predictions,
                                                                  report.class_names)))
            tf.summary.text(f"{report.split}/per_class", per_class_markdown(report))
        writer.flush()
    return paths


def _png_batch(png: bytes) -> tf.Tensor:
    return tf.expand_dims(tf.io.decode_png(png, channels=4), 0)


# --- text and figures --------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "  -   " if np.isnan(x) else f"{x:.4f}"


def per_class_lines(report: Report, limit: int = 30) -> list[str]:
    """A console table of precision/recall/support; with more than `limit` classes, the
    `limit` of lowest recall."""
    order = list(range(len(report.class_names)))
    title = "per class"
    if len(order) > limit:
        recall = np.nan_to_num(report.per_class["recall"], nan=2.0)
        order = sorted(order, key=lambda i: (recall[i], i))[:limit]
        title = f"per class ({limit} of {len(report.class_names)}, lowest recall first)"
    width = max([len("class")] + [len(report.class_names[i]) for i in order])
    lines = [f"{title}:", f"  {'class':<{width}}  precision  recall  support"]
    precision, recall = report.per_class["precision"], report.per_class["recall"]
    for i in order:
        lines.append(f"  {report.class_names[i]:<{width}}  {_fmt(precision[i])}     "
                     f"{_fmt(recall[i])}  {report.per_class['support'][i]:7d}")
    return lines


def per_class_markdown(report: Report) -> str:
    lines = ["| class | precision | recall | support |", "|---|---|---|---|"]
    for i, name in enumerate(report.class_names):
        lines.append(f"| {name} | {_fmt(report.per_class['precision'][i])} | "
                     f"{_fmt(report.per_class['recall'][i])} | {report.per_class['support'][i]} |")
    return "\n".join(lines)
