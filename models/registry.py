"""Model name -> builder. Every model takes uint8-range pixels (0-255) of shape [S, S, 3] and
returns float32 logits; input normalisation is inside the model, so an exported model needs no
preprocessing beyond decode and resize."""
from __future__ import annotations

from typing import Callable

import keras
from keras import layers

from models import small_resnet


def _inputs(image_size: int) -> keras.KerasTensor:
    return keras.Input(shape=(image_size, image_size, 3), name="image")


def _head(features, num_classes: int) -> keras.KerasTensor:
    # Logits in float32 even under a mixed policy: softmax/cross-entropy need the range.
    return layers.Dense(num_classes, dtype="float32", name="logits")(features)


def build_small_resnet(num_classes: int, image_size: int) -> keras.Model:
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    features = small_resnet.backbone(x)
    return keras.Model(inputs, _head(features, num_classes), name="small_resnet")


def build_resnet50(num_classes: int, image_size: int) -> keras.Model:
    """keras.applications ResNet50 from scratch (weights=None) with our input scaling and head."""
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    base = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg",
                                       input_shape=(image_size, image_size, 3))
    return keras.Model(inputs, _head(base(x), num_classes), name="resnet50")


MODELS: dict[str, Callable[[int, int], keras.Model]] = {
    "small_resnet": build_small_resnet,
    "resnet50": build_resnet50,
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build(name: str, num_classes: int, image_size: int) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return MODELS[name](num_classes, image_size)
