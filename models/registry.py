"""Model name -> builder. Every model takes uint8-range pixels (0-255) of shape [S, S, 3] and
returns float32 logits; input normalisation is inside the model, so an exported model needs no
preprocessing beyond decode and resize.

Keras (and so TensorFlow) is imported when a model is built, not when the names are listed, so
that flag parsing, which lists the names, answers at once.
"""
from __future__ import annotations

import importlib


# name -> "module:function"; each function takes (num_classes, image_size).
MODELS: dict[str, str] = {
    "small_resnet": "models.builders:small_resnet",
    "resnet50": "models.builders:resnet50",
}


# Smallest --image_size a model accepts (keras.applications.ResNet50 refuses below 32x32).
MIN_IMAGE_SIZE: dict[str, int] = {"resnet50": 32}


def model_names() -> list[str]:
    return sorted(MODELS)


def min_image_size(name: str) -> int:
    return MIN_IMAGE_SIZE.get(name, 8)


def build(name: str, num_classes: int, image_size: int):
    """A new keras.Model `name` for `num_classes` classes at `image_size`^2 pixels."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    module, function = MODELS[name].split(":")
    return getattr(importlib.import_module(module), function)(num_classes, image_size)
