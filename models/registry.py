"""Model name -> builder. Every model takes uint8-range pixels (0-255) of shape [S, S, 3] and
returns float32 logits from a Dense layer named "logits"; input normalisation (each
architecture's own) is inside the model, so an exported model needs no preprocessing beyond
decode and resize.

Keras (and so TensorFlow) is imported when a model is built, not when the names are listed, so
that flag parsing and `--list_models`, which read this table, answer at once.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    builder: str  # "module:function" taking (num_classes, image_size, weights, fused_batchnorm)
    description: str  # one line for --list_models
    min_image_size: int = 8
    imagenet: bool = False  # keras.applications publishes ImageNet weights (--pretrained=imagenet)


MODELS: dict[str, ModelInfo] = {
    "small_resnet": ModelInfo(
        "models.builders:small_resnet",
        "CPU-sized ResNet (3 stages of basic blocks, 0.3M parameters) for small images such as "
        "the demo's 32x32; no ImageNet weights"),
    "resnet50": ModelInfo(
        "models.builders:resnet50",
        "keras.applications ResNet50 (23.6M backbone parameters), the reference model; "
        "ImageNet mean subtracted", 32, True),
    "resnet50v2": ModelInfo(
        "models.builders:resnet50v2",
        "keras.applications ResNet50V2 (pre-activation, 23.6M backbone parameters); "
        "pixels scaled to [-1, 1]", 32, True),
    "efficientnetb0": ModelInfo(
        "models.builders:efficientnetb0",
        "keras.applications EfficientNetB0 (4.0M backbone parameters, 224 px native); "
        "ImageNet normalisation inside", 32, True),
    "mobilenetv3small": ModelInfo(
        "models.builders:mobilenetv3small",
        "keras.applications MobileNetV3Small (0.9M backbone parameters), fastest on CPU; "
        "pixels scaled to [-1, 1]", 32, True),
    "convnexttiny": ModelInfo(
        "models.builders:convnexttiny",
        "keras.applications ConvNeXtTiny (27.8M backbone parameters), most accurate when "
        "fine-tuned; ImageNet normalisation inside", 32, True),
}

# Smallest --image_size a model accepts (keras.applications refuse below 32x32).
MIN_IMAGE_SIZE: dict[str, int] = {name: info.min_image_size for name, info in MODELS.items()}


def model_names() -> list[str]:
    return sorted(MODELS)


def min_image_size(name: str) -> int:
    return MIN_IMAGE_SIZE.get(name, 8)


def has_imagenet_weights(name: str) -> bool:
    return name in MODELS and MODELS[name].imagenet


def describe() -> str:
    """One line per model, `name  description`, for --list_models."""
    width = max(len(name) for name in MODELS)
    return "\n".join(f"{name:<{width}}  {MODELS[name].description}" for name in model_names())


def build(name: str, num_classes: int, image_size: int, weights: str | None = None,
          fused_batchnorm: bool = True):
    """A new keras.Model `name` for `num_classes` classes at `image_size`^2 pixels; `weights`
    None (random) or "imagenet" (keras.applications' backbone weights, downloaded once into
    ~/.keras/models; the head stays random). `fused_batchnorm`: BatchNormalization layers are
    models/batchnorm.py's fused layer (same variables); False builds Keras' stock layers."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights must be None or 'imagenet', not {weights!r}")
    if weights == "imagenet" and not MODELS[name].imagenet:
        raise ValueError(f"model {name!r} has no ImageNet weights")
    module, function = MODELS[name].builder.split(":")
    builder = getattr(importlib.import_module(module), function)
    return builder(num_classes, image_size, weights=weights, fused_batchnorm=fused_batchnorm)
