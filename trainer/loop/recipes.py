"""The training recipes as small transforms, composed once from the Config (optax-style).

- The loss: `make_loss(label_smoothing, class_weights)` -> `loss(labels, logits, weights)`, the
  weighted per-example cross-entropy (no reduction).
- Gradient accumulation: `accumulate(micro_step, k)` turns the gradient function of one batch
  into one that cuts the replica's batch into k micro-batches and sums their gradients.
- The gradient chain: `chain(*transforms)` of functions `Gradients -> Gradients`, run in the
  replica context after the backward pass and before `apply_gradients` (which all-reduces):
  float16 overflow agreement, the global norm across replicas, its mean, clipping.

`Recipe.from_config` holds the Config fields the step uses; `gradient_chain(recipe, ...)` builds
the chain they ask for. Nothing here branches on an option while a step runs: each option
decides at build time whether its transform is in the chain.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The recipes of the train step (their flags: --label_smoothing, --class_weight,
    --grad_accum_steps, --clip_grad_norm)."""
    label_smoothing: float = 0.0
    class_weights: np.ndarray | None = None  # each class's loss weight (None: all 1)
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0

    @classmethod
    def from_config(cls, config, class_weights=None) -> "Recipe":
        return cls(config.label_smoothing, class_weights, config.grad_accum_steps,
                   config.clip_grad_norm)


# --- the loss ---------------------------------------------------------------------------------
def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float = 0.0
                  ) -> tf.Tensor:
    """Per-example loss, no reduction. `labels`: class ids [B], or soft targets [B, C] whose rows
    sum to 1. With label smoothing e the target is (1 - e) * target + e / C."""
    logits = tf.cast(logits, tf.float32)
    if labels.shape.rank == 1 and not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if labels.shape.rank == 1:
        log_probs = tf.nn.log_softmax(logits)
        true_class = tf.gather(log_probs, tf.cast(labels, tf.int32), axis=1, batch_dims=1)
        return -(1.0 - label_smoothing) * true_class \
            - label_smoothing * tf.reduce_mean(log_probs, axis=-1)
    targets = tf.cast(labels, tf.float32)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + \
            label_smoothing / tf.cast(tf.shape(targets)[-1], tf.float32)
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)


LossFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def make_loss(label_smoothing: float = 0.0, class_weights=None) -> LossFn:
    """`loss(labels, logits, weights)`: the per-example cross-entropy (smoothed by
    `label_smoothing`) times each example's weight (0 for padding) and, with `class_weights`,
    its class's weight (soft targets: their mix of the class weights)."""
    if class_weights is None:
        return lambda labels, logits, weights: \
            cross_entropy(labels, logits, label_smoothing) * weights
    per_class = tf.constant(class_weights, tf.float32)

    def weighted(labels, logits, weights):
        if labels.shape.rank == 2:
            class_weight = tf.linalg.matvec(tf.cast(labels, tf.float32), per_class)
        else:
            class_weight = tf.gather(per_class, tf.cast(labels, tf.int32))
        return cross_entropy(labels, logits, label_smoothing) * weights * class_weight
    return weighted


# --- gradient accumulation --------------------------------------------------------------------
# micro_step(images, labels, weights, micro_batches=, unconnected=) -> (gradients, loss_sum):
# the gradients of this batch's part of the global mean loss and the sum of its per-example
# losses (it updates the metrics).
MicroStep = Callable[..., tuple]


def accumulate(micro_step: MicroStep, k: int, variables: Callable[[], list]
               ) -> Callable[..., tuple]:
    """The gradient function of a replica's batch as k micro-batches (k > 1): their gradients
    summed before the one optimizer update, and the sum of their per-example losses. Each micro
    loss is divided by the *global* batch (and carries 1/k of the regularization losses), so the
    sum is the whole batch's gradient; the per-replica batch divides by k (checked earlier).
    `variables()`: the variables the gradients are of (read when the step is traced)."""
    def accumulated(images, labels, weights):
        micro = tf.shape(images)[0] // k
        total = [tf.zeros(v.shape, v.dtype) for v in variables()]
        loss_sum = tf.constant(0.0)
        for i in tf.range(k):
            part = tf.range(i * micro, (i + 1) * micro)
            gradients, micro_loss_sum = micro_step(
                tf.gather(images, part), tf.gather(labels, part), tf.gather(weights, part),
                micro_batches=k, unconnected=tf.UnconnectedGradients.ZERO)
            total = [t + tf.cast(g, t.dtype) for t, g in zip(total, gradients)]
            loss_sum += micro_loss_sum
        return total, loss_sum
    return accumulated


# --- the gradient chain -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gradients:
    """One replica's gradients on their way to `apply_gradients`, and once measured the global
    norm of the all-reduced gradient (the transforms after `global_norm` read it)."""
    values: list
    norm: tf.Tensor | None = None


Transform = Callable[[Gradients], Gradients]


def chain(*transforms: Transform) -> Callable[[list], list]:
    """One function `gradients -> gradients` running `transforms` in order."""
    def run(values: list) -> list:
        gradients = Gradients(list(values))
        for transform in transforms:
            gradients = transform(gradients)
        return gradients.values
    return run


def agree_on_overflow() -> Transform:
    """Keras' LossScaleOptimizer checks replica 0's gradients only, so an inf on another
    replica alone would be applied. Agree across replicas: if any replica's gradients are
    not finite, every replica's become NaN, and the optimizer skips the step everywhere and
    lowers the loss scale."""
    def transform(gradients: Gradients) -> Gradients:
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients.values])
        context = tf.distribute.get_replica_context()
        overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                        1.0 - tf.cast(finite, tf.float32))
        poison = tf.where(overflowed > 0, float("nan"), 0.0)
        return dataclasses.replace(
            gradients, values=[g + tf.cast(poison, g.dtype) for g in gradients.values])
    return transform


def global_norm(loss_scale: Callable[[], tf.Tensor] | None = None) -> Transform:
    """The norm of the all-reduced (summed) gradient: the true gradient, not the scaled one
    (`loss_scale`: the float16 loss scale the gradients carry)."""
    def transform(gradients: Gradients) -> Gradients:
        context = tf.distribute.get_replica_context()
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients.values)
        if loss_scale is not None:
            scale = tf.cast(loss_scale(), tf.float32)
            summed = [tf.cast(g, tf.float32) / scale for g in summed]
        return dataclasses.replace(gradients, norm=tf.linalg.global_norm(summed))
    return transform


def record_norm(mean: keras.metrics.Mean) -> Transform:
    """Adds the global norm (before clipping) to `mean`; skipped (non-finite) float16 steps are
    left out."""
    def transform(gradients: Gradients) -> Gradients:
        finite = tf.math.is_finite(gradients.norm)
        mean.update_state(tf.where(finite, gradients.norm, 0.0),
                          sample_weight=tf.cast(finite, tf.float32))
        return gradients
    return transform


def clip_by_global_norm(max_norm: float) -> Transform:
    """Clip by the norm of the all-reduced (summed) gradient, as one big-batch step would.

    Keras' `global_clipnorm` clips each replica's gradient before the all-reduce. Here the
    replicas' gradients are summed once to measure the norm (`global_norm`, earlier in the
    chain); each replica then scales its own gradient by the same factor, so the optimizer's own
    all-reduce yields the clipped sum."""
    def transform(gradients: Gradients) -> Gradients:
        factor = tf.minimum(1.0, max_norm / tf.maximum(gradients.norm, 1e-12))
        return dataclasses.replace(
            gradients, values=[g * tf.cast(factor, g.dtype) for g in gradients.values])
    return transform


def gradient_chain(recipe: Recipe, optimizer: keras.optimizers.Optimizer,
                   norm_mean: keras.metrics.Mean | None = None) -> Callable[[list], list]:
    """The chain the recipe and the optimizer ask for, in the order that matters: overflow
    agreement first (a skipped step's norm is NaN, left out of the mean), the norm before
    clipping (the mean reports the unclipped norm)."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    transforms: list[Transform] = []
    if loss_scaled:
        transforms.append(agree_on_overflow())
    if recipe.clip_grad_norm > 0 or norm_mean is not None:
        transforms.append(global_norm((lambda: optimizer.dynamic_scale) if loss_scaled else None))
    if norm_mean is not None:
        transforms.append(record_norm(norm_mean))
    if recipe.clip_grad_norm > 0:
        transforms.append(clip_by_global_norm(recipe.clip_grad_norm))
    return chain(*transforms)

