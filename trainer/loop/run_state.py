"""The run's state in one object: model, optimizer, counters, weight averages, metrics, the
compiled steps, the checkpoint keepers and the TensorBoard writers.

Counters (all in every checkpoint, so a restart continues them):
  step              training steps done; drives the schedule, the logs and the data position
  skipped_batches   batches --on_nan=rollback left out; data position = step + skipped_batches
  rollbacks         how many times --on_nan=rollback restored a checkpoint
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from models import registry, transfer
from trainer.config import Config, RunPlan
from trainer.loop.ema import WeightAverage
from trainer.errors import TrainingError
from trainer.loop.inputs import Inputs
from trainer.loop import testing_aids
from trainer.loop.optimization import make_optimizer
from trainer.loop.recipes import Recipe
from trainer.loop.step import Metrics, StepFunctions
from trainer.report import summaries
from trainer.state import checkpoints, run_dir


def _counter(name: str) -> tf.Variable:
    """An int64 run counter (create in the strategy scope); replica 0's value is the value."""
    return tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


@dataclasses.dataclass
class RunState:
    config: Config
    plan: RunPlan
    inputs: Inputs
    strategy: tf.distribute.Strategy
    chief: bool
    work_dir: str  # model_dir on the chief; a scratch folder on other workers
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    skipped_batches: tf.Variable
    rollbacks: tf.Variable
    weight_average: WeightAverage | None
    train_metrics: Metrics
    eval_metrics: Metrics
    gradient_norm: keras.metrics.Mean | None
    steps: StepFunctions
    keeper: checkpoints.CheckpointKeeper
    best: checkpoints.BestCheckpoint
    writers: summaries.Summaries

    @property
    def current_step(self) -> int:
        return int(self.step.numpy())

    @property
    def position(self) -> int:
        """The data position of the next step (see the module doc)."""
        return self.current_step + int(self.skipped_batches.numpy())

    @property
    def end_position(self) -> int:
        """The data position after the last step."""
        return self.plan.total_steps + int(self.skipped_batches.numpy())

    def averaged(self):
        """Inside the block the model holds the weights that are evaluated and exported: the
        moving averages with --ema_decay, else its own."""
        return self.weight_average.applied() if self.weight_average else \
            contextlib.nullcontext()

    def restore_latest(self) -> str | None:
        """Restore the newest checkpoint (non-chief workers: the chief's)."""
        return self.keeper.restore_latest(
            os.path.join(self.config.model_dir, run_dir.CHECKPOINT_DIR))


def build_model(config: Config, num_classes: int, donor, log) -> keras.Model:
    """The registry's model (in the strategy scope), with the donor's weights copied by name."""
    model = registry.build(config.model, num_classes, config.image_size,
                           fused_batchnorm=config.fused_batchnorm)
    if donor is not None:
        report = transfer.copy_weights_by_name(donor.model, model, skip_head=donor.skip_head)
        if report.backbone_copied == 0:
            raise TrainingError(f"--pretrained={config.pretrained}: no layer of "
                             f"{donor.description} matches a layer of --model={config.model} "
                             f"by name and shape")
        log(f"pretrained: {donor.description}: {report.describe()}")
    return model


def balanced_class_weights(labels, num_classes: int) -> np.ndarray:
    """--class_weight=balanced: n_images / (n_classes * n_images_of_class), scikit-learn's
    convention (a class with no training image gets 0: it never occurs anyway)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)


def describe_class_weights(weights: np.ndarray, class_names: list[str]) -> str:
    """The start-up line of --class_weight=balanced: the smallest and the largest weight with
    their classes, or one phrase when every class weighs the same."""
    if np.all(weights == weights[0]):
        return f"class weights (balanced): all {weights[0]:.3g} (the train classes are balanced)"
    low, high = int(weights.argmin()), int(weights.argmax())
    return (f"class weights (balanced): {weights[low]:.3g} ({class_names[low]}) to "
            f"{weights[high]:.3g} ({class_names[high]})")


def create(config: Config, plan: RunPlan, inputs: Inputs, strategy, chief: bool,
           work_dir: str, donor, log) -> RunState:
    """Model, optimizer and counters in the strategy scope (the optimizer built before the
    first traced step), the compiled steps, keepers and writers. Nothing is restored yet."""
    with strategy.scope():
        model = build_model(config, len(inputs.class_names), donor, log)
        step, skipped, rollbacks = (_counter(name) for name in
                                    ("global_step", "skipped_batches", "rollbacks"))
        optimizer = make_optimizer(config, plan, model, step)
        # Averages of the initial (or pretrained) weights; restored with the checkpoint.
        weight_average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
        train_metrics = Metrics.create("train")
        eval_metrics = Metrics.create("eval", len(inputs.class_names))
        gradient_norm = keras.metrics.Mean(name="gradient_norm") \
            if config.summary_histograms else None
    class_weights = balanced_class_weights(inputs.train.labels, len(inputs.class_names)) \
        if config.class_weight == "balanced" and not inputs.synthetic else None
    if class_weights is not None:
        log(describe_class_weights(class_weights, inputs.class_names))
    steps = StepFunctions(
        strategy, model, optimizer, global_batch_size=plan.global_batch_size,
        train_metrics=train_metrics, eval_metrics=eval_metrics,
        recipe=Recipe.from_config(config, class_weights), xla=config.xla,
        gradient_norm=gradient_norm, time_input=not config.deterministic,
        weight_average=weight_average, step=step,
        record_ids=config.debug_record_batches and not inputs.synthetic)
    testing_aids.install(steps, config, step, skipped)
    checkpoint_dir = os.path.join(work_dir, run_dir.CHECKPOINT_DIR)
    keeper = checkpoints.CheckpointKeeper(
        checkpoint_dir, model=model, optimizer=optimizer, step=step,
        max_to_keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps,
        ema=weight_average.trackable if weight_average else None,
        skipped_batches=skipped, rollbacks=rollbacks)
    # The best model by --best_metric, kept apart from the latest K (its record is part of
    # every checkpoint; best.json read from the chief).
    best = checkpoints.BestCheckpoint(
        os.path.join(work_dir, run_dir.BEST_DIR), keeper.checkpoint, metric=config.best_metric,
        state_directory=os.path.join(config.model_dir, run_dir.BEST_DIR))
    writers = summaries.Summaries(config.model_dir if chief else None)
    return RunState(config, plan, inputs, strategy, chief, work_dir, model, optimizer, step,
                    skipped, rollbacks, weight_average, train_metrics, eval_metrics,
                    gradient_norm, steps, keeper, best, writers)
