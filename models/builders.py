"""Model builders: each takes (num_classes, image_size) and returns a keras.Model that takes
0-255 pixels and returns float32 logits. Registered by name in models/registry.py."""
from __future__ import annotations

import keras
from keras import layers

from models.small_resnet import backbone as small_resnet_backbone


def _inputs(image_size: int) -> keras.KerasTensor:
    return keras.Input(shape=(image_size, image_size, 3), name="image")


def _head(features, num_classes: int) -> keras.KerasTensor:
    # Logits in float32 even under a mixed policy: softmax/cross-entropy need the range.
    return layers.Dense(num_classes, dtype="float32", name="logits")(features)


def small_resnet(num_classes: int, image_size: int) -> keras.Model:
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    features = small_resnet_backbone(x)
    return keras.Model(inputs, _head(features, num_classes), name="small_resnet")


def resnet50(num_classes: int, image_size: int) -> keras.Model:
    """keras.applications ResNet50 from scratch (weights=None) with our input scaling and head."""
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    base = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg",
                                       input_shape=(image_size, image_size, 3))
    return keras.Model(inputs, _head(base(x), num_classes), name="resnet50")
