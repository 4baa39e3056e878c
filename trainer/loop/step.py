"""The inner step: replica train/eval functions and the tf.functions that run them.

`train_loop(iterator, num_steps)` runs `num_steps` steps in one tf.function call (a tf.range
loop), each step `strategy.run(replica step)`. Loss per replica is the per-example cross-entropy
summed and divided by the *global* batch (`tf.nn.compute_average_loss`), so the all-reduced
gradients are those of the global mean loss. Metrics are updated with the per-example losses
and are reduced across replicas when read, so the reported loss is the true global mean.

Labels are int class ids [B] (the hard-label path, unchanged by the options below unless they are
used) or soft targets [B, classes] from MixUp/CutMix (data/augment.py), whose accuracy counts the
argmax of the target. `label_smoothing` smooths either. With `grad_accum_steps` k > 1 each
replica's batch is cut into k micro-batches whose gradients are summed before the one optimizer
update (each micro-batch loss is divided by the *global* batch, so the sum is the gradient of the
whole batch's mean loss). A `WeightAverage` (trainer/loop/ema.py) is updated after every step.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf


class PerClassRecall(keras.metrics.Metric):
    """Correct and total counts per true class (vector state, summed across replicas when
    read, so exact with several replicas). `result()` is the recall per class, NaN for a class
    with no example; balanced accuracy is the mean over the classes present."""

    def __init__(self, num_classes: int, name: str = "per_class_recall"):
        super().__init__(name=name)
        self.num_classes = num_classes
        self.correct = self.add_variable((num_classes,), "zeros", name="correct")
        self.total = self.add_variable((num_classes,), "zeros", name="total")

    def update_state(self, labels, logits, sample_weight=None):
        labels = tf.cast(labels, tf.int32)
        weights = tf.ones_like(labels, tf.float32) if sample_weight is None else \
            tf.cast(sample_weight, tf.float32)
        hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
        self.correct.assign_add(tf.math.unsorted_segment_sum(hit * weights, labels,
                                                             self.num_classes))
        self.total.assign_add(tf.math.unsorted_segment_sum(weights, labels, self.num_classes))

    def result(self):
        return tf.math.divide_no_nan(self.correct, self.total) + tf.where(
            self.total > 0, 0.0, float("nan"))


@dataclasses.dataclass
class Metrics:
    """Keras metrics created in the strategy scope; read with `results()`."""
    loss: keras.metrics.Mean
    accuracy: keras.metrics.SparseCategoricalAccuracy
    top5_accuracy: keras.metrics.SparseTopKCategoricalAccuracy
    per_class: PerClassRecall | None = None  # evaluation only (balanced accuracy)

    @classmethod
    def create(cls, prefix: str, num_classes: int | None = None) -> "Metrics":
        return cls(keras.metrics.Mean(name=f"{prefix}_loss"),
                   keras.metrics.SparseCategoricalAccuracy(name=f"{prefix}_accuracy"),
                   keras.metrics.SparseTopKCategoricalAccuracy(k=5, name=f"{prefix}_top5"),
                   PerClassRecall(num_classes, f"{prefix}_per_class") if num_classes else None)

    def update(self, labels, logits, per_example_loss, weights):
        if labels.shape.rank == 2:  # soft targets (MixUp/CutMix): the class they weigh most
            labels = tf.argmax(labels, axis=-1, output_type=tf.int32)
        self.loss.update_state(per_example_loss, sample_weight=weights)
        self.accuracy.update_state(labels, logits, sample_weight=weights)
        self.top5_accuracy.update_state(labels, logits, sample_weight=weights)
        if self.per_class is not None:
            self.per_class.update_state(labels, logits, sample_weight=weights)

    def reset(self) -> None:
        for metric in (self.loss, self.accuracy, self.top5_accuracy, self.per_class):
            if metric is not None:
                metric.reset_state()

    def results(self) -> dict:
        """Means over everything seen since reset; `images` counts weight-1 examples. With
        per-class counts also `balanced_accuracy` (mean recall over the classes present) and
        `per_class_recall` (a list in label order, None for a class with no example)."""
        values = {"loss": float(self.loss.result()), "accuracy": float(self.accuracy.result()),
                  "top5_accuracy": float(self.top5_accuracy.result()),
                  "images": int(round(float(keras.ops.convert_to_numpy(self.loss.count))))}
        if self.per_class is not None:
            recall = keras.ops.convert_to_numpy(self.per_class.result())
            present = recall[~np.isnan(recall)]
            values["balanced_accuracy"] = float(present.mean()) if present.size else 0.0
            values["per_class_recall"] = [None if np.isnan(r) else float(r) for r in recall]
        return values


@dataclasses.dataclass
class EvalOutputs:
    """What one evaluation pass gives besides the metrics: every image of weight > 0 in the
    order of the global batches (the files' order with one input pipeline; interleaved by
    pipeline with several workers)."""
    logits: np.ndarray  # [N, C] float32
    labels: np.ndarray  # [N] int
    gallery_index: np.ndarray  # [M] indices into logits of the images in gallery_images
    gallery_images: np.ndarray  # [M, S, S, 3] uint8, misclassified, the first M in that order


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


def replicas_share_the_cpu(strategy: tf.distribute.Strategy) -> bool:
    """Several replicas of this process on logical CPU devices (--cpu_devices), which share the
    same cores."""
    devices = strategy.extended.worker_devices
    return len(devices) > 1 and all("CPU" in device.upper() for device in devices)


class StepFunctions:
    """Holds the model, optimizer and metrics the compiled steps close over."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, *, global_batch_size: int,
                 train_metrics: Metrics, eval_metrics: Metrics, xla: bool = False,
                 clip_grad_norm: float = 0.0, time_input: bool = True,
                 gradient_norm: keras.metrics.Mean | None = None, label_smoothing: float = 0.0,
                 grad_accum_steps: int = 1, weight_average=None,
                 step: tf.Variable | None = None, skipped_batches: tf.Variable | None = None,
                 nan_batches: tuple[int, ...] = (), record_ids: bool = False,
                 class_weights=None):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.global_batch_size = global_batch_size
        self.train_metrics = train_metrics
        self.eval_metrics = eval_metrics
        self.clip_grad_norm = clip_grad_norm
        # Off under op determinism, which refuses tf.timestamp, and with several replicas on one
        # host's CPU: there the timer's control dependencies (each step's input waits for the
        # previous step's loss) halved the step rate (docs/benchmarks.md, "Input timer"), and
        # the share it measures is only an upper bound anyway.
        self.time_input = time_input and not replicas_share_the_cpu(strategy)
        self.gradient_norm = gradient_norm  # optional: mean global gradient norm (before clipping)
        self.label_smoothing = label_smoothing
        self.grad_accum_steps = grad_accum_steps
        self.weight_average = weight_average  # trainer.loop.ema.WeightAverage or None
        # The run's global step, counted here after every step (skipped float16 steps too): it
        # drives the learning-rate schedule (optimization.py) and, plus `skipped_batches`
        # (batches --on_nan=rollback left out), the data position.
        self.step = step
        self.skipped_batches = skipped_batches
        self.nan_batches = tuple(nan_batches)  # --debug_nan_batches: data positions made NaN
        # --debug_record_batches: batches carry image ids; the loop returns each step's ids in
        # global replica order.
        self.record_ids = record_ids
        # --class_weight: the training loss weight of each class (None: all 1).
        self.class_weights = None if class_weights is None else \
            tf.constant(class_weights, tf.float32)
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # The state averaged across replicas after each loop (BatchNorm moving statistics),
        # fixed now: freezing the backbone later makes its weights non-trainable too.
        self._state_variables = [v for v in model.non_trainable_variables
                                 if keras.backend.is_float_dtype(v.dtype)]
        self._xla = xla
        self.retrace()

    def retrace(self) -> None:
        """New tf.functions: call after changing which layers are trainable (the steps read
        `model.trainable_variables` and BatchNorm's mode when they are traced).

        With `xla`, what XLA can take is compiled: the forward pass, the loss and the backward
        pass (`_forward_backward`), and the evaluation forward pass. The cross-replica parts
        stay outside: `apply_gradients` (its all-reduce and the mirrored variables' updates),
        the overflow and clipping all-reduces and the metrics. Compiling the whole replica step
        fails under MirroredStrategy with several devices ("Trying to access resource
        .../replica_1 located in device CPU:1 from device CPU:0"): XLA launches the cluster on
        one device while apply_gradients touches every replica's copy."""
        self._replica_train = tf.function(self._replica_train_step)
        self._replica_eval = tf.function(self._replica_eval_step)
        self._forward_backward_compiled = tf.function(self._forward_backward, jit_compile=True) \
            if self._xla else self._forward_backward
        self._predict = tf.function(self._predict_logits, jit_compile=True) \
            if self._xla else self._predict_logits
        self.train_loop = tf.function(self._train_loop)
        # One compiled evaluation step for every split and pass (traced once per batch shape).
        self._eval_batch = tf.function(self._eval_batch_step)
        self._gather_images = tf.function(self._gather_images_step)

    def eval_loop(self, dataset, gallery_size: int = 0) -> EvalOutputs:
        """One pass over a distributed evaluation dataset: the eval metrics are updated on every
        replica (reduced when read, weight-0 padding not counted), and the float32 logits and
        the labels of every image of weight > 0 are gathered from every replica and worker
        (EvalOutputs). With `gallery_size`, also the first `gallery_size` misclassified images.
        Every worker must call it (the gathers are collective); whether a batch's images are
        gathered is decided from gathered values, the same on every worker."""
        logits, labels, index, images = [], [], [], []
        seen, image_shape = 0, None
        for batch in dataset:
            batch_logits, batch_labels, weights = (t.numpy() for t in self._eval_batch(*batch))
            keep = weights > 0
            wrong = np.flatnonzero(keep & (batch_logits.argmax(axis=1) != batch_labels))
            if image_shape is None:
                image_shape = self.strategy.experimental_local_results(batch[0])[0].shape[1:]
            if wrong.size and len(index) < gallery_size:
                pixels = self._gather_images(batch[0]).numpy().astype(np.uint8)
                position = np.cumsum(keep) - 1  # index among this batch's kept images
                for i in wrong[:gallery_size - len(index)]:
                    index.append(seen + int(position[i]))
                    images.append(pixels[i])
            logits.append(batch_logits[keep])
            labels.append(batch_labels[keep])
            seen += int(keep.sum())
        return EvalOutputs(
            np.concatenate(logits) if logits else np.zeros([0, 0], np.float32),
            np.concatenate(labels).astype(np.int64) if labels else np.zeros([0], np.int64),
            np.asarray(index, np.int64),
            np.stack(images) if images else np.zeros([0, *(image_shape or (0, 0, 3))], np.uint8))

    # --- replica functions ------------------------------------------------------------------
    def _replica_train_step(self, images, labels, weights, poison=None):
        model, optimizer = self.model, self.optimizer
        if self.grad_accum_steps > 1:
            gradients, loss_sum = self._accumulated_gradients(images, labels, weights, poison)
        else:
            logits, per_example, gradients = self._forward_backward_compiled(
                images, labels, weights, poison=poison)
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
        if self.grad_accum_steps == 1:  # (accumulation updated the metrics per micro-batch)
            self.train_metrics.update(labels, logits, per_example, weights)
            loss_sum = tf.reduce_sum(per_example)
        return loss_sum

    def _forward_backward(self, images, labels, weights, *, micro_batches: int = 1,
                          unconnected=tf.UnconnectedGradients.NONE, poison=None):
        """Logits, weighted per-example losses, and the gradients (with respect to
        `model.trainable_variables`, read here so that XLA can compile this function) of this
        batch's part of the global mean loss (divided by the *global* batch), plus 1/micro_batches of the
        regularization losses (so that k micro-batches count them once); loss-scaled gradients
        with float16."""
        model = self.model
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = cross_entropy(labels, logits, self.label_smoothing) * weights * \
                self._class_weight_of(labels)
            if poison is not None:  # --debug_nan_batches: NaN losses on purpose
                per_example *= poison
            loss = tf.nn.compute_average_loss(per_example,
                                              global_batch_size=self.global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses)) / micro_batches
            tape_loss = self.optimizer.scale_loss(loss) if self._loss_scaled else loss
        gradients = tape.gradient(tape_loss, model.trainable_variables,
                                  unconnected_gradients=unconnected)
        return logits, per_example, gradients

    def _predict_logits(self, images):
        return self.model(images, training=False)

    def _class_weight_of(self, labels):
        """Each example's --class_weight (soft targets: their mix of the class weights)."""
        if self.class_weights is None:
            return 1.0
        if labels.shape.rank == 2:
            return tf.linalg.matvec(tf.cast(labels, tf.float32), self.class_weights)
        return tf.gather(self.class_weights, tf.cast(labels, tf.int32))

    def _accumulated_gradients(self, images, labels, weights, poison=None):
        """The summed gradients of `grad_accum_steps` micro-batches of this replica's batch, and
        the sum of their per-example losses; metrics are updated per micro-batch. Each micro
        loss is divided by the global batch, so the sum is the whole batch's gradient."""
        model, k = self.model, self.grad_accum_steps
        variables = model.trainable_variables
        micro = tf.shape(images)[0] // k  # the per-replica batch divides by k (checked earlier)
        total = [tf.zeros(v.shape, v.dtype) for v in variables]
        loss_sum = tf.constant(0.0)
        for i in tf.range(k):
            part = tf.range(i * micro, (i + 1) * micro)
            x, y, w = tf.gather(images, part), tf.gather(labels, part), tf.gather(weights, part)
            logits, per_example, gradients = self._forward_backward_compiled(
                x, y, w, micro_batches=k,
                unconnected=tf.UnconnectedGradients.ZERO, poison=poison)
            total = [t + tf.cast(g, t.dtype) for t, g in zip(total, gradients)]
            self.train_metrics.update(y, logits, per_example, w)
            loss_sum += tf.reduce_sum(per_example)
        return total, loss_sum

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
        # The plain cross-entropy (no label smoothing): the validation loss of the predictions.
        logits = self._predict(images)
        per_example = cross_entropy(labels, logits)
        self.eval_metrics.update(labels, logits, per_example, weights)
        return tf.cast(logits, tf.float32), labels, weights

    # --- cross-replica loops ----------------------------------------------------------------
    def _train_loop(self, iterator, num_steps):
        """Runs num_steps steps. Returns the true mean loss of each step's global batch, and the
        seconds spent in `next(iterator)` (timestamps around it). With one replica this is the
        wait for input; with several replicas on one CPU it also catches the previous step's
        tail still running on the other logical device, so it is an upper bound there
        (docs/benchmarks.md)."""
        step_losses = tf.TensorArray(tf.float32, size=num_steps)
        step_ids = tf.TensorArray(tf.int32, size=num_steps, element_shape=[None])
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
            if self.record_ids:
                *batch, ids = batch
                step_ids = step_ids.write(i, self.strategy.gather(ids, axis=0))
            per_replica_sum = self.strategy.run(self._replica_train,
                                                args=tuple(batch) + self._poison())
            loss_sum = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_sum, axis=None)
            if self.weight_average is not None:
                self.weight_average.update(self.strategy, self.optimizer.iterations)
            previous_loss = loss_sum / self.global_batch_size
            step_losses = step_losses.write(i, previous_loss)
            if self.step is not None:
                self.step.assign_add(1)
        if self.strategy.num_replicas_in_sync > 1:
            self._average_model_state()
        ids = step_ids.stack() if self.record_ids else tf.zeros([0, 0], tf.int32)
        return step_losses.stack(), input_seconds, ids

    def _poison(self) -> tuple:
        """(NaN,) when this step's data position is one of --debug_nan_batches, else (1,);
        () without the flag (nothing added to the graph)."""
        if not self.nan_batches:
            return ()
        position = self.step + (self.skipped_batches if self.skipped_batches is not None else 0)
        hit = tf.reduce_any(tf.equal(position, tf.constant(self.nan_batches, tf.int64)))
        return (tf.where(hit, float("nan"), 1.0),)

    def _average_model_state(self):
        """Keras 3 BatchNormalization updates its moving statistics per replica (mirrored
        variables with aggregation NONE), so replicas drift apart while the checkpoint keeps
        replica 0's copy. Averaging them after each loop makes every replica, the checkpoint and
        the exported model hold the same values. The moving averages are linear in the batch
        statistics, so this equals averaging at every step."""
        state = self._state_variables
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

    def _gather_images_step(self, images):
        """A global batch's uint8 images from every replica, as int32 (all-gather takes no
        uint8)."""
        wide = self.strategy.run(lambda x: tf.cast(x, tf.int32), args=(images,))
        return self.strategy.gather(wide, axis=0)

    def _eval_batch_step(self, images, labels, weights):
        """One global evaluation batch: the replica steps, then their logits, labels and
        weights concatenated in replica order."""
        outputs = self.strategy.run(self._replica_eval, args=(images, labels, weights))
        return tuple(self.strategy.gather(value, axis=0) for value in outputs)
