"""A CPU-sized ResNet (basic blocks, three stages) for small images such as the demo's 32x32."""
from __future__ import annotations

from keras import layers

from models.batchnorm import FusedBatchNormalization


def _conv_bn(x, filters, stride, bn_momentum, name, relu=True,
             norm=layers.BatchNormalization):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = norm(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _block(x, filters, stride, bn_momentum, name, norm):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                 kernel_initializer="he_normal", name=f"{name}_proj_conv")(x)
        shortcut = norm(momentum=bn_momentum, name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn(x, filters, stride, bn_momentum, f"{name}_a", norm=norm)
    y = _conv_bn(y, filters, 1, bn_momentum, f"{name}_b", relu=False, norm=norm)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def backbone(x, widths=(32, 64, 128), blocks_per_stage=1, bn_momentum=0.9,
             fused_batchnorm=True):
    """Stem and stages; `bn_momentum` 0.9 because short runs leave 0.99's moving stats behind.
    `fused_batchnorm`: models/batchnorm.py's fused layer, else Keras' own (same variables)."""
    norm = FusedBatchNormalization if fused_batchnorm else layers.BatchNormalization
    x = _conv_bn(x, widths[0], 1, bn_momentum, "stem", norm=norm)
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _block(x, filters, stride, bn_momentum, f"stage{stage + 1}_block{block + 1}", norm)
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)
