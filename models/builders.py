"""Model builders: each takes (num_classes, image_size, weights=None, fused_batchnorm=True) and
returns a keras.Model
that takes 0-255 pixels and returns float32 logits from a Dense layer named "logits" (the head;
everything before it is the backbone). Registered by name in models/registry.py.

Each keras.applications model gets the input preprocessing its ImageNet weights were trained
with, inside the model and the same whether the weights are random or ImageNet's, so a model
trained from scratch, one fine-tuned from ImageNet and one loaded from another run all take the
same pixels.

With `fused_batchnorm` (the default) every BatchNormalization layer is models/batchnorm.py's
FusedBatchNormalization (same variables and names, FusedBatchNormV3 inside); keras.applications
models are built stock and their BatchNormalization layers swapped, weights kept.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers

from models.batchnorm import swap_batchnorm
from models.small_resnet import backbone as small_resnet_backbone

HEAD = "logits"
# ImageNet statistics of RGB pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The per-channel mean Caffe-style ImageNet weights (ResNet50) subtract, in RGB order.
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)


def _inputs(image_size: int) -> keras.KerasTensor:
    return keras.Input(shape=(image_size, image_size, 3), name="image")


def _head(features, num_classes: int) -> keras.KerasTensor:
    # Logits in float32 even under a mixed policy: softmax/cross-entropy need the range.
    return layers.Dense(num_classes, dtype="float32", name=HEAD)(features)


def _fused(base: keras.Model, fused_batchnorm: bool) -> keras.Model:
    return swap_batchnorm(base) if fused_batchnorm else base


def small_resnet(num_classes: int, image_size: int, weights: str | None = None,
                 fused_batchnorm: bool = True) -> keras.Model:
    if weights is not None:
        raise ValueError("small_resnet has no pretrained weights")
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    features = small_resnet_backbone(x, fused_batchnorm=fused_batchnorm)
    return keras.Model(inputs, _head(features, num_classes), name="small_resnet")


def resnet50(num_classes: int, image_size: int, weights: str | None = None,
             fused_batchnorm: bool = True) -> keras.Model:
    """keras.applications ResNet50 with our head. Its ImageNet weights expect Caffe-style input
    (BGR, ImageNet mean subtracted, no scaling); here the input stays RGB and the first
    convolution's input channels are reversed when the ImageNet weights are loaded instead."""
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0, offset=[-m for m in CAFFE_MEAN_RGB], name="normalize")(inputs)
    base = keras.applications.ResNet50(include_top=False, weights=weights, pooling="avg",
                                       input_shape=(image_size, image_size, 3))
    if weights == "imagenet":
        conv = base.get_layer("conv1_conv")
        kernel, bias = conv.get_weights()
        conv.set_weights([kernel[:, :, ::-1, :], bias])
    base = _fused(base, fused_batchnorm)
    return keras.Model(inputs, _head(base(x), num_classes), name="resnet50")


def resnet50v2(num_classes: int, image_size: int, weights: str | None = None,
               fused_batchnorm: bool = True) -> keras.Model:
    """keras.applications ResNet50V2 (its ImageNet weights expect pixels in [-1, 1])."""
    inputs = _inputs(image_size)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    base = keras.applications.ResNet50V2(include_top=False, weights=weights, pooling="avg",
                                         input_shape=(image_size, image_size, 3))
    base = _fused(base, fused_batchnorm)
    return keras.Model(inputs, _head(base(x), num_classes), name="resnet50v2")


def efficientnetb0(num_classes: int, image_size: int, weights: str | None = None,
                   fused_batchnorm: bool = True) -> keras.Model:
    """keras.applications EfficientNetB0, which normalises 0-255 pixels itself: Rescaling(1/255)
    and a Normalization layer that holds the ImageNet statistics once the ImageNet weights are
    loaded, followed (only then) by a further Rescaling(1/sqrt(std)). With random weights the
    Normalization layer is set to the same overall function, (x/255 - mean) / std^1.5, so that
    both builds take the same pixels (the fine-tuning copy leaves this layer alone)."""
    inputs = _inputs(image_size)
    base = keras.applications.EfficientNetB0(include_top=False, weights=weights, pooling="avg",
                                             input_shape=(image_size, image_size, 3))
    if weights is None:
        normalization = [layer for layer in base.layers
                         if isinstance(layer, layers.Normalization)]
        assert len(normalization) == 1, normalization
        normalization[0].adapt_mean.assign(np.array(IMAGENET_MEAN, np.float32))
        normalization[0].adapt_variance.assign(np.array(IMAGENET_STD, np.float32) ** 3)
        normalization[0].finalize_state()
    base = _fused(base, fused_batchnorm)
    return keras.Model(inputs, _head(base(inputs), num_classes), name="efficientnetb0")


def mobilenetv3small(num_classes: int, image_size: int, weights: str | None = None,
                     fused_batchnorm: bool = True) -> keras.Model:
    """keras.applications MobileNetV3Small with its own preprocessing layer (to [-1, 1])."""
    inputs = _inputs(image_size)
    base = keras.applications.MobileNetV3Small(
        input_shape=(image_size, image_size, 3), include_top=False, weights=weights,
        pooling="avg", include_preprocessing=True)
    base = _fused(base, fused_batchnorm)
    return keras.Model(inputs, _head(base(inputs), num_classes), name="mobilenetv3small")


def convnexttiny(num_classes: int, image_size: int, weights: str | None = None,
                 fused_batchnorm: bool = True) -> keras.Model:
    """keras.applications ConvNeXtTiny with its own preprocessing (ImageNet normalisation)."""
    inputs = _inputs(image_size)
    base = keras.applications.ConvNeXtTiny(
        include_top=False, include_preprocessing=True, weights=weights, pooling="avg",
        input_shape=(image_size, image_size, 3))
    base = _fused(base, fused_batchnorm)  # (LayerNormalization only: left as it is)
    return keras.Model(inputs, _head(base(inputs), num_classes), name="convnexttiny")
