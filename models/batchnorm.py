"""A fused BatchNormalization layer, and the swap of keras.applications' BatchNormalization
layers for it.

Keras 3's `BatchNormalization` on the TensorFlow backend is not fused: it computes the moments
with separate reductions, normalises with `tf.nn.batch_normalization` (several elementwise ops
and their gradients), and in a mixed policy casts bfloat16/float16 activations to float32 and
back. tf_keras called FusedBatchNormV3 (one op forward, one op backward, low-precision
activations with float32 statistics). On this project's CPU that is 1.3x (float32) to 1.8x
(mixed_bfloat16) on a ResNet50 train step (docs/benchmarks.md).

`FusedBatchNormalization` subclasses the Keras layer: `build` is Keras' own, so the variables,
their names, shapes, order and aggregation (gamma, beta, moving_mean, moving_variance) are the
stock layer's, and checkpoints, `.keras`/`.weights.h5` files, ImageNet weights, copying weights
by name, freezing and the cross-replica averaging of the moving statistics work unchanged.
Only `call` differs, and only where the fused op applies (4-D channels-last inputs in float32,
bfloat16 or float16, no renorm, no mask, no synchronized statistics); everywhere else it is the
Keras computation.

Variance convention: FusedBatchNormV3 normalises with the population (biased) batch variance,
like Keras, but the batch variance it *returns* is Bessel-corrected (x n/(n-1), n = batch x
height x width). tf_keras fed that corrected variance into the moving average; Keras 3 feeds the
population variance. This layer keeps Keras 3's convention: the returned variance is multiplied
back by (n-1)/n before the moving-average update, so the fused and the stock layer hold the same
moving statistics (tests/test_batchnorm.py checks both halves of this).
"""
from __future__ import annotations

import keras
import tensorflow as tf

FUSED_DTYPES = ("float32", "bfloat16", "float16")


@keras.saving.register_keras_serializable(package="birdtrainer")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization computed with FusedBatchNormV3 where it applies."""

    def fused_applies(self, inputs, mask=None) -> bool:
        """Whether `call` takes the fused path for these inputs (else Keras' own)."""
        rank = len(inputs.shape)
        return (rank == 4 and self.axis in (-1, 3) and not self.renorm and mask is None
                and not self.synchronized and keras.backend.standardize_dtype(inputs.dtype)
                in FUSED_DTYPES)

    def call(self, inputs, training=None, mask=None):
        if not self.fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        # The activations stay in their dtype (bfloat16 under mixed_bfloat16); the statistics,
        # scale and offset are float32, as the fused op wants them.
        channels = inputs.shape[-1]
        gamma = self.gamma.value if self.scale else tf.ones([channels], tf.float32)
        beta = self.beta.value if self.center else tf.zeros([channels], tf.float32)
        # Frozen (trainable=False) means inference mode, as in the Keras layer.
        if training and self.trainable:
            return self._fused_training(inputs, gamma, beta)
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=self.moving_mean.value,
            variance=self.moving_variance.value, epsilon=self.epsilon, is_training=False)
        return outputs

    def _fused_training(self, inputs, gamma, beta):
        outputs, mean, corrected_variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
        # Keras 3's convention for the moving average: the population variance (see the module
        # docstring). n = the elements per channel in this (replica's) batch.
        shape = tf.shape(inputs)
        n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
        variance = corrected_variance * ((n - 1.0) / tf.maximum(n, 1.0))
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + variance * (1.0 - momentum))
        return outputs


def swap_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of `model` (a keras.applications Functional model) whose BatchNormalization layers
    are FusedBatchNormalization layers with the same config (names included) and weights; all
    other layers are cloned unchanged. Returns `model` itself when it has none."""
    if not any(type(layer) is keras.layers.BatchNormalization for layer in model.layers):
        return model

    def clone(layer):
        config = layer.get_config()
        if type(layer) is keras.layers.BatchNormalization:
            return FusedBatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    swapped = keras.models.clone_model(model, clone_function=clone)
    # Layer by layer through each layer's own save/load, not set_weights: a Normalization layer
    # (EfficientNet) recomputes its mean and variance from the loaded state only that way.
    for source, target in zip(model.layers, swapped.layers):
        store: dict = {}
        source.save_own_variables(store)
        target.load_own_variables(store)
    return swapped
