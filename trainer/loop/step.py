"""The train and eval steps: the replica functions and the tf.functions that run them.

`train_loop(iterator, num_steps)` runs `num_steps` steps in one tf.function call (a tf.range
loop), each step `strategy.run(_replica_train)`: forward, loss, gradients (`_forward_backward`),
the gradient chain, apply. The recipes (label smoothing, class weights, gradient accumulation,
clipping, float16 overflow agreement) are transforms composed once from the Config in
trainer/loop/recipes.py; the bookkeeping (step counter, weight averages, BatchNorm averaging,
input timer) is in `train_loop`.

Labels are int class ids [B] or soft targets [B, classes] from MixUp/CutMix (data/augment.py),
whose accuracy counts the argmax of the target.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from trainer.loop import recipes
from trainer.loop.recipes import cross_entropy  # noqa: F401 (public here too)


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


def replicas_share_the_cpu(strategy: tf.distribute.Strategy) -> bool:
    """Several replicas of this process on logical CPU devices (--cpu_devices), which share the
    same cores."""
    devices = strategy.extended.worker_devices
    return len(devices) > 1 and all("CPU" in device.upper() for device in devices)


class StepFunctions:
    """The compiled train and eval loops over the model, optimizer and metrics they close over.

    The recipes (`recipe`, or its fields as keywords: `label_smoothing=`, `class_weights=`,
    `grad_accum_steps=`, `clip_grad_norm=`) are composed once here into `loss_fn` and
    `gradient_chain` (trainer/loop/recipes.py). Bookkeeping, in `train_loop`: `step` (the run's
    global step, counted after every step, skipped float16 steps too: it drives the learning-rate
    schedule, optimization.py, and the data position), `weight_average` (trainer/loop/ema.py),
    the BatchNorm averaging and the input timer. `gradient_norm`: a Mean of the global gradient
    norm (before clipping). `record_ids` says that the training batches carry image ids
    (--debug_record_batches); the loop returns each step's ids in global replica order.
    """

    # The methods `retrace()` turns into tf.functions of the same name.
    COMPILED = ("train_loop", "_replica_train", "_replica_eval", "_eval_batch", "_gather_images")

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, *, global_batch_size: int,
                 train_metrics: Metrics, eval_metrics: Metrics,
                 recipe: recipes.Recipe = recipes.Recipe(), xla: bool = False,
                 time_input: bool = True, gradient_norm: keras.metrics.Mean | None = None,
                 weight_average=None, step: tf.Variable | None = None, record_ids: bool = False,
                 **recipe_fields):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.global_batch_size = global_batch_size
        self.train_metrics, self.eval_metrics = train_metrics, eval_metrics
        self.recipe = dataclasses.replace(recipe, **recipe_fields)
        self.loss_fn = recipes.make_loss(self.recipe.label_smoothing, self.recipe.class_weights)
        self.gradient_chain = recipes.gradient_chain(self.recipe, optimizer, gradient_norm)
        # Off under op determinism, which refuses tf.timestamp, and with several replicas on one
        # host's CPU: there the timer's control dependencies (each step's input waits for the
        # previous step's loss) halved the step rate (docs/benchmarks.md, "Input timer"), and
        # the share it measures is only an upper bound anyway.
        self.time_input = time_input and not replicas_share_the_cpu(strategy)
        self.weight_average, self.step, self.record_ids = weight_average, step, record_ids
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
        pass (`_forward_backward`), and the evaluation forward pass (`_predict`). The
        cross-replica parts stay outside: `apply_gradients` (its all-reduce and the mirrored
        variables' updates), the gradient chain's all-reduces and the metrics. Compiling the
        whole replica step fails under MirroredStrategy with several devices ("Trying to access
        resource .../replica_1 located in device CPU:1 from device CPU:0"): XLA launches the
        cluster on one device while apply_gradients touches every replica's copy."""
        def method(name):
            return getattr(type(self), name).__get__(self)
        for name in self.COMPILED:  # (one compiled eval step for every split and pass)
            setattr(self, name, tf.function(method(name)))
        for name in ("_forward_backward", "_predict"):
            setattr(self, name, tf.function(method(name), jit_compile=True) if self._xla
                    else method(name))
        k = self.recipe.grad_accum_steps
        self._batch_gradients = recipes.accumulate(
            self._micro_step, k, lambda: self.model.trainable_variables) if k > 1 \
            else self._micro_step

    # --- the replica train step -------------------------------------------------------------
    def _replica_train(self, images, labels, weights):
        """One replica's part of one step: forward, loss and gradients (over micro-batches with
        --grad_accum_steps), the gradient chain, apply. Returns the sum of its per-example
        losses. The loss is divided by the *global* batch (`tf.nn.compute_average_loss`), so
        the all-reduced gradients are those of the global mean loss."""
        gradients, loss_sum = self._batch_gradients(images, labels, weights)
        gradients = self.gradient_chain(gradients)
        # apply_gradients sums the replicas' gradients (all-reduce) before the update.
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return loss_sum

    def _micro_step(self, images, labels, weights, *, micro_batches: int = 1,
                    unconnected=tf.UnconnectedGradients.NONE):
        """The gradients of one (micro-)batch and the sum of its per-example losses; the train
        metrics are updated with the per-example losses (reduced across replicas when read, so
        the reported loss is the true global mean)."""
        logits, per_example, gradients = self._forward_backward(
            images, labels, weights, micro_batches=micro_batches, unconnected=unconnected)
        self.train_metrics.update(labels, logits, per_example, weights)
        return gradients, tf.reduce_sum(per_example)

    def _forward_backward(self, images, labels, weights, *, micro_batches: int = 1,
                          unconnected=tf.UnconnectedGradients.NONE):
        """Logits, weighted per-example losses, and the gradients (with respect to
        `model.trainable_variables`, read here so that XLA can compile this function) of this
        batch's part of the global mean loss, plus 1/micro_batches of the regularization losses
        (so that k micro-batches count them once); loss-scaled gradients with float16."""
        model = self.model
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = self.loss_fn(labels, logits, weights)
            loss = tf.nn.compute_average_loss(per_example,
                                              global_batch_size=self.global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses)) / micro_batches
            tape_loss = self.optimizer.scale_loss(loss) if self._loss_scaled else loss
        gradients = tape.gradient(tape_loss, model.trainable_variables,
                                  unconnected_gradients=unconnected)
        return logits, per_example, gradients

    # --- the train loop: steps and bookkeeping ----------------------------------------------
    def train_loop(self, iterator, num_steps):
        """Runs num_steps steps, each the replica step on every replica then the bookkeeping
        (weight averages, step counter); after them the BatchNorm averaging. Returns the true
        mean loss of each step's global batch, the seconds spent in `next(iterator)`, and the
        image ids the batches carry (--debug_record_batches: [steps, global batch]; else
        [0, 0])."""
        step_losses = tf.TensorArray(tf.float32, size=num_steps)
        step_ids = tf.TensorArray(tf.int32, size=num_steps, element_shape=[None])
        input_seconds = tf.constant(0.0, tf.float64)
        previous_loss = tf.constant(0.0)
        for i in tf.range(num_steps):
            batch, seconds = self._next_batch(iterator, previous_loss)
            input_seconds += seconds
            images, labels, weights, *ids = batch
            if ids:  # (decided by the dataset's structure when traced)
                step_ids = step_ids.write(i, self.strategy.gather(ids[0], axis=0))
            per_replica_sum = self.strategy.run(self._replica_train,
                                                args=(images, labels, weights))
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

    def _next_batch(self, iterator, previous_loss):
        """`next(iterator)` and the seconds it took (timestamps around it; 0 when not timed).
        With one replica this is the wait for input; with several replicas on one CPU it also
        catches the previous step's tail still running on the other logical device, so it is an
        upper bound there (docs/benchmarks.md)."""
        if not self.time_input:
            return next(iterator), tf.constant(0.0, tf.float64)
        # Without this dependency the loop may start timing step i+1 during step i.
        with tf.control_dependencies([previous_loss]):
            before = tf.timestamp()
        with tf.control_dependencies([before]):
            batch = next(iterator)
        with tf.control_dependencies(tf.nest.flatten(batch, expand_composites=True)):
            return batch, tf.timestamp() - before

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

    # --- evaluation -------------------------------------------------------------------------
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

    def _eval_batch(self, images, labels, weights):
        """One global evaluation batch: the replica steps, then their logits, labels and
        weights concatenated in replica order."""
        outputs = self.strategy.run(self._replica_eval, args=(images, labels, weights))
        return tuple(self.strategy.gather(value, axis=0) for value in outputs)

    def _replica_eval(self, images, labels, weights):
        # The plain cross-entropy (no label smoothing): the validation loss of the predictions.
        logits = self._predict(images)
        per_example = cross_entropy(labels, logits)
        self.eval_metrics.update(labels, logits, per_example, weights)
        return tf.cast(logits, tf.float32), labels, weights

    def _predict(self, images):
        return self.model(images, training=False)

    def _gather_images(self, images):
        """A global batch's uint8 images from every replica, as int32 (all-gather takes no
        uint8)."""
        wide = self.strategy.run(lambda x: tf.cast(x, tf.int32), args=(images,))
        return self.strategy.gather(wide, axis=0)
