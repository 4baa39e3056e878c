"""Temperature scaling (Guo et al. 2017): one temperature T, fitted on the valid split's logits
by minimising the negative log-likelihood, makes softmax(logits / T) better calibrated without
changing any top-1 prediction (T > 0 keeps the order of the logits). The expected calibration
error (ECE) is measured with 15 equal-width confidence bins, as in that paper.

Pure NumPy: the logits come from trainer/tools/analysis.py's predict_split.
"""
from __future__ import annotations

import dataclasses

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_sum - z[np.arange(len(labels)), labels]))


def all_correct(logits: np.ndarray, labels: np.ndarray) -> bool:
    return bool(np.all(np.argmax(logits, axis=1) == labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [e^-4, e^4] that minimises the NLL of softmax(logits / T). The NLL is convex
    in 1/T, hence unimodal in log T: a golden-section search finds the minimum. When every
    image is classified correctly the NLL falls without bound as T -> 0 (every probability
    -> 1): nothing can be fitted, and T stays 1."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0 or all_correct(logits, labels):
        return 1.0
    low, high = -4.0, 4.0  # log T
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = (negative_log_likelihood(logits, labels, np.exp(x)) for x in (a, b))
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = negative_log_likelihood(logits, labels, np.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = negative_log_likelihood(logits, labels, np.exp(b))
    return float(np.exp((low + high) / 2))


@dataclasses.dataclass
class Reliability:
    """Per confidence bin: mean confidence, accuracy and image count; and the ECE."""
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float


def reliability(probabilities: np.ndarray, labels: np.ndarray,
                bins: int = ECE_BINS) -> Reliability:
    """ECE = sum over bins of |accuracy - mean confidence| x share of images in the bin, the
    confidence being the top-1 probability, bins of equal width over [0, 1]."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    safe = np.maximum(count, 1)
    mean_confidence = np.bincount(index, confidence, bins) / safe
    accuracy = np.bincount(index, correct, bins) / safe
    ece = float(np.sum(np.abs(accuracy - mean_confidence) * count) / max(1, len(labels)))
    return Reliability(mean_confidence, accuracy, count.astype(np.int64), ece)


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE, NLL and accuracy before and after dividing the logits by `temperature`."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {"images": int(len(labels)),
            "ece_before": reliability(before, labels).ece,
            "ece_after": reliability(after, labels).ece,
            "nll_before": negative_log_likelihood(logits, labels),
            "nll_after": negative_log_likelihood(logits, labels, temperature),
            "accuracy_before": float(np.mean(before.argmax(1) == labels)),
            "accuracy_after": float(np.mean(after.argmax(1) == labels))}
