"""The inner step: replica train/eval functions and the tf.functions that run them.

`train_loop(iterator, num_steps)` runs `num_steps` steps in one tf.function call (a tf.range
loop), each step `strategy.run(replica step)`. Loss per replica is the per-example cross-entropy
summed and divided by the *global* batch (`tf.nn.compute_average_loss`), so the all-reduced
gradients are those of the global mean loss. Metrics are updated with the per-example losses
and are reduced across replicas when read, so the reported loss is the true global mean.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass
class Metrics:
    """Keras metrics created in the strategy scope; read with `results()`."""
    loss: keras.metrics.Mean
    accuracy: keras.metrics.SparseCategoricalAccuracy
    top5_accuracy: keras.metrics.SparseTopKCategoricalAccuracy

    @classmethod
    def create(cls, prefix: str) -> "Metrics":
        return cls(keras.metrics.Mean(name=f"{prefix}_loss"),
                   keras.metrics.SparseCategoricalAccuracy(name=f"{prefix}_accuracy"),
                   keras.metrics.SparseTopKCategoricalAccuracy(k=5, name=f"{prefix}_top5"))

    def update(self, labels, logits, per_example_loss, weights):
        self.loss.update_state(per_example_loss, sample_weight=weights)
        self.accuracy.update_state(labels, logits, sample_weight=weights)
        self.top5_accuracy.update_state(labels, logits, sample_weight=weights)

    def reset(self) -> None:
        for metric in (self.loss, self.accuracy, self.top5_accuracy):
            metric.reset_state()

    def results(self) -> dict[str, float]:
        """Means over everything seen since reset; `images` counts weight-1 examples."""
        return {"loss": float(self.loss.result()), "accuracy": float(self.accuracy.result()),
                "top5_accuracy": float(self.top5_accuracy.result()),
                "images": int(round(float(keras.ops.convert_to_numpy(self.loss.count))))}


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example loss, no reduction."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.cast(logits, tf.float32))


class StepFunctions:
    """Holds the model, optimizer and metrics the compiled steps close over."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, *, global_batch_size: int,
                 train_metrics: Metrics, eval_metrics: Metrics, xla: bool = False,
                 clip_grad_norm: float = 0.0, time_input: bool = True,
                 gradient_norm: keras.metrics.Mean | None = None):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.global_batch_size = global_batch_size
        self.train_metrics = train_metrics
        self.eval_metrics = eval_metrics
        self.clip_grad_norm = clip_grad_norm
        # Off under op determinism, which refuses tf.timestamp.
        self.time_input = time_input
        self.gradient_norm = gradient_norm  # optional: mean global gradient norm (before clipping)
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self._replica_train = tf.function(self._replica_train_step, jit_compile=xla or None)
        self._replica_eval = tf.function(self._replica_eval_step, jit_compile=xla or None)
        self.train_loop = tf.function(self._train_loop)
        self.eval_loop = tf.function(self._eval_loop)

    # --- replica functions ------------------------------------------------------------------
    def _replica_train_step(self, images, labels, weights):
        model, optimizer = self.model, self.optimizer
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = cross_entropy(labels, logits) * weights
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            tape_loss = optimizer.scale_loss(loss) if self._loss_scaled else loss
        gradients = tape.gradient(tape_loss, model.trainable_variables)
        if self._loss_scaled:
            gradients = self._poison_if_any_replica_overflowed(gradients)
        if self.clip_grad_norm > 0 or self.gradient_norm is not None:
            norm = self._global_norm_across_replicas(gradients)
        if self.gradient_norm is not None:  # skipped (non-finite) float16 steps are left out
            finite = tf.math.is_finite(norm)
            self.gradient_norm.update_state(tf.where(finite, norm, 0.0),
                                            sample_weight=tf.cast(finite, tf.float32))
        if self.clip_grad_norm > 0:
            gradients = self._clip_by_global_norm_across_replicas(gradients, norm)
        # apply_gradients sums the replicas' gradients (all-reduce) before the update.
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        self.train_metrics.update(labels, logits, per_example, weights)
        return tf.reduce_sum(per_example)

    def _poison_if_any_replica_overflowed(self, gradients):
        """Keras' LossScaleOptimizer checks replica 0's gradients only, so an inf on another
        replica alone would be applied. Agree across replicas: if any replica's gradients are
        not finite, every replica's become NaN, and the optimizer skips the step everywhere and
        lowers the loss scale."""
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
        context = tf.distribute.get_replica_context()
        overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                        1.0 - tf.cast(finite, tf.float32))
        poison = tf.where(overflowed > 0, float("nan"), 0.0)
        return [g + tf.cast(poison, g.dtype) for g in gradients]

    def _global_norm_across_replicas(self, gradients):
        """The norm of the all-reduced (summed) gradient: the true gradient, not the scaled one."""
        context = tf.distribute.get_replica_context()
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        if self._loss_scaled:
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)
            summed = [tf.cast(g, tf.float32) / scale for g in summed]
        return tf.linalg.global_norm(summed)

    def _clip_by_global_norm_across_replicas(self, gradients, norm):
        """Clip by the norm of the all-reduced (summed) gradient, as one big-batch step would.

        Keras' `global_clipnorm` clips each replica's gradient before the all-reduce. Here the
        replicas' gradients are summed once to measure the norm; each replica then scales its
        own gradient by the same factor, so the optimizer's own all-reduce yields the clipped sum.
        `norm` is `_global_norm_across_replicas(gradients)`.
        """
        factor = tf.minimum(1.0, self.clip_grad_norm / tf.maximum(norm, 1e-12))
        return [g * tf.cast(factor, g.dtype) for g in gradients]

    def _replica_eval_step(self, images, labels, weights):
        logits = self.model(images, training=False)
        per_example = cross_entropy(labels, logits)
        self.eval_metrics.update(labels, logits, per_example, weights)

    # --- cross-replica loops ----------------------------------------------------------------
    def _train_loop(self, iterator, num_steps):
        """Runs num_steps steps. Returns the true mean loss of each step's global batch, and the
        seconds spent in `next(iterator)` (timestamps around it). With one replica this is the
        wait for input; with several replicas on one CPU it also catches the previous step's
        tail still running on the other logical device, so it is an upper bound there
        (docs/benchmarks.md)."""
        step_losses = tf.TensorArray(tf.float32, size=num_steps)
        input_seconds = tf.constant(0.0, tf.float64)
        previous_loss = tf.constant(0.0)
        for i in tf.range(num_steps):
            if self.time_input:
                # Without this dependency the loop may start timing step i+1 during step i.
                with tf.control_dependencies([previous_loss]):
                    before = tf.timestamp()
                with tf.control_dependencies([before]):
                    batch = next(iterator)
                with tf.control_dependencies(tf.nest.flatten(batch, expand_composites=True)):
                    input_seconds += tf.timestamp() - before
            else:
                batch = next(iterator)
            per_replica_sum = self.strategy.run(self._replica_train, args=batch)
            loss_sum = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_sum, axis=None)
            previous_loss = loss_sum / self.global_batch_size
            step_losses = step_losses.write(i, previous_loss)
        if self.strategy.num_replicas_in_sync > 1:
            self._average_model_state()
        return step_losses.stack(), input_seconds

    def _average_model_state(self):
        """Keras 3 BatchNormalization updates its moving statistics per replica (mirrored
        variables with aggregation NONE), so replicas drift apart while the checkpoint keeps
        replica 0's copy. Averaging them after each loop makes every replica, the checkpoint and
        the exported model hold the same values. The moving averages are linear in the batch
        statistics, so this equals averaging at every step."""
        state = [v for v in self.model.non_trainable_variables
                 if keras.backend.is_float_dtype(v.dtype)]
        if not state:
            return

        def replica_means():
            context = tf.distribute.get_replica_context()
            # tf.identity: this replica's copy as a plain tensor (all_reduce of the variable
            # object itself fails under MultiWorkerMirroredStrategy).
            return [context.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(v.value))
                    for v in state]

        means = self.strategy.run(replica_means)
        for variable, mean in zip(state, means):  # cross-replica assign: every local copy
            variable.assign(self.strategy.experimental_local_results(mean)[0])

    def _eval_loop(self, dataset):
        for batch in dataset:
            self.strategy.run(self._replica_eval, args=batch)
