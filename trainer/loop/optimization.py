"""Optimizer and learning-rate schedule from a Config and RunPlan.

One counter drives the schedule: the run's global step (`step` in the checkpoint), which counts
every training step, also those float16's loss scaler skips. The optimizer reads the rate through
a callable over that variable, so the logged rate (`learning_rate_of_step`), the applied rate and
the data position agree; `optimizer.iterations` (which skipped steps do not advance) is left to
Adam's bias correction and the weight averages.
"""
from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from models import transfer
from trainer.config import Config, RunPlan
from trainer.loop.resume import SCHEDULE_FLAGS, ResumeError


class RunSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to the peak rate, then cosine decay to 0 at the last step. After an
    extension (plan.decay_from_step > 0) the rate instead goes on from `decay_from_lr` at that
    step and decays on a cosine to 0 at the new last step: no jump."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.base = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if plan.warmup_steps else plan.learning_rate,
            decay_steps=max(1, plan.total_steps - plan.warmup_steps),
            warmup_target=plan.learning_rate if plan.warmup_steps else None,
            warmup_steps=plan.warmup_steps)

    def __call__(self, step):
        plan = self.plan
        if not plan.decay_from_step:
            return self.base(step)
        step = tf.cast(step, tf.float32)
        start = float(plan.decay_from_step)
        done = tf.clip_by_value((step - start) / max(1.0, plan.total_steps - start), 0.0, 1.0)
        tail = plan.decay_from_lr * 0.5 * (1.0 + tf.cos(math.pi * done))
        return tf.where(step < start, self.base(step), tail)

    def get_config(self):
        return dataclasses.asdict(self.plan)


def learning_rate_schedule(plan: RunPlan) -> RunSchedule:
    return RunSchedule(plan)


def rebatched(saved: RunPlan, fresh: RunPlan, allowed: list[str]) -> RunPlan:
    """The saved plan, re-expressed in global batches of the fresh plan's size when the global
    batch changed (another --batch_size, or --scale_batch on another replica count) and
    --allow_change=batch_size accepts it: every step count is scaled by old / new batch, so
    the epoch position and the schedule are counted in images. Else ResumeError."""
    if fresh.global_batch_size == saved.global_batch_size:
        return saved
    if not {"batch_size", "scale_batch"} & set(allowed):
        raise ResumeError(f"the global batch is {fresh.global_batch_size} ({fresh.num_replicas} "
                          f"replica(s)) but the run used {saved.global_batch_size}: pass "
                          f"--allow_change=batch_size to continue from the number of images "
                          f"seen, or use the same global batch, or a new --model_dir")
    factor = saved.global_batch_size / fresh.global_batch_size
    return dataclasses.replace(
        saved, num_replicas=fresh.num_replicas, global_batch_size=fresh.global_batch_size,
        eval_global_batch_size=fresh.eval_global_batch_size, learning_rate=fresh.learning_rate,
        steps_per_epoch=fresh.steps_per_epoch, total_steps=max(1, round(
            saved.total_steps * factor)), warmup_steps=round(saved.warmup_steps * factor),
        decay_from_step=round(saved.decay_from_step * factor),
        decay_from_lr=saved.decay_from_lr * fresh.learning_rate / saved.learning_rate)


def continue_plan(saved: RunPlan, fresh: RunPlan, step: int, accepted: list[str]
                  ) -> tuple[RunPlan, str | None]:
    """The plan a resumed run goes on with, and a line describing an accepted schedule change.

    The saved plan stays in force (only the replica count may differ) unless a schedule flag was
    accepted: then the fresh plan's length, warmup and peak apply, and if the length changed
    past the warmup, the rate goes on from where it was and decays to 0 at the new end.
    `saved` and `step` are in batches of the fresh size (see `rebatched`)."""
    changed = [name for name in accepted if name in SCHEDULE_FLAGS]
    if not changed:
        return dataclasses.replace(saved, num_replicas=fresh.num_replicas), None
    ratio = fresh.learning_rate / saved.learning_rate
    plan = dataclasses.replace(fresh, decay_from_step=saved.decay_from_step,
                               decay_from_lr=saved.decay_from_lr * ratio)
    before = float(RunSchedule(saved)(step))
    if fresh.total_steps != saved.total_steps and step > fresh.warmup_steps:
        plan = dataclasses.replace(plan, decay_from_step=step, decay_from_lr=before * ratio)
    after = float(RunSchedule(plan)(step))
    hint = "" if after > 0 or step >= plan.total_steps else (
        " (the schedule had already decayed to 0, so the added steps train at 0: to train on, "
        "start a new run with --pretrained=<this model_dir>)")
    return plan, (f"{', '.join('--' + name for name in changed)} changed (--allow_change): "
                  f"the run ends at step {plan.total_steps} (was {saved.total_steps}); the "
                  f"learning rate at step {step} is {after:.4g} (was to be {before:.4g}) and "
                  f"decays on a cosine to 0 at step {plan.total_steps}{hint}")


def _with_lr_multipliers(optimizer_class):
    """`optimizer_class` whose update of the variables given to `set_lr_multiplier` uses the
    learning rate times a factor (the backbone's --backbone_lr_multiplier). Keras 3 passes the
    learning rate to `update_step` per variable; `_var_key` maps a replica's copy of a variable
    to the same key as the variable itself, as the optimizer's own slot lookup does."""

    class WithLrMultipliers(optimizer_class):
        _lr_multiplied: frozenset = frozenset()
        _lr_multiplier: float = 1.0

        def set_lr_multiplier(self, variables, multiplier: float) -> None:
            self._lr_multiplied = frozenset(self._var_key(v) for v in variables)
            self._lr_multiplier = float(multiplier)

        def update_step(self, gradient, variable, learning_rate):
            if self._var_key(variable) in self._lr_multiplied:
                learning_rate = learning_rate * self._lr_multiplier
            return super().update_step(gradient, variable, learning_rate)

    WithLrMultipliers.__name__ = optimizer_class.__name__
    return WithLrMultipliers


def _with_fused_update(optimizer_class):
    """`optimizer_class` (Keras Adam or AdamW) whose per-variable update is TensorFlow's one
    fused kernel, ResourceApplyAdam, instead of Keras 3's seven separate ops (two assign_adds,
    an assign_sub and their arithmetic, each a pass over the variable's memory): the same
    formula, m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2),
    var -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps), in one pass, on the same slot
    variables (checkpoints are unchanged). AdamW's decoupled weight decay is applied by Keras
    before the update, as before. Sparse gradients, amsgrad and non-float32 variables take
    Keras' own update. Under MirroredStrategy this runs inside `extended.update` for each
    device, where a mirrored slot's `.handle` is that device's copy."""

    class FusedUpdate(optimizer_class):
        def update_step(self, gradient, variable, learning_rate):
            target = variable.value if isinstance(variable, keras.Variable) else variable
            if (self.amsgrad or isinstance(gradient, tf.IndexedSlices)
                    or target.dtype != tf.float32):
                return super().update_step(gradient, variable, learning_rate)
            index = self._get_variable_index(variable)
            t = tf.cast(self.iterations + 1, tf.float32)
            beta1, beta2 = tf.cast(self.beta_1, tf.float32), tf.cast(self.beta_2, tf.float32)
            return tf.raw_ops.ResourceApplyAdam(
                var=target.handle, m=self._momentums[index].value.handle,
                v=self._velocities[index].value.handle, beta1_power=tf.pow(beta1, t),
                beta2_power=tf.pow(beta2, t), lr=tf.cast(learning_rate, tf.float32),
                beta1=beta1, beta2=beta2, epsilon=tf.cast(self.epsilon, tf.float32),
                grad=tf.cast(gradient, tf.float32))

    FusedUpdate.__name__ = optimizer_class.__name__
    return FusedUpdate


def make_optimizer(config: Config, plan: RunPlan, model: keras.Model, step: tf.Variable
                   ) -> keras.optimizers.Optimizer:
    """The configured optimizer, built for `model`'s trainable variables (call it in the
    strategy's scope). With --backbone_lr_multiplier != 1 the backbone (every trainable
    variable but the head's) is updated at the multiplied learning rate. --weight_decay leaves
    out one-dimensional variables (biases, normalisation scales and offsets), as timm and
    big_vision do: decaying them towards 0 only fights the normalisation. The learning rate is
    the schedule at the run's global `step` (see the module doc)."""
    plan_schedule = learning_rate_schedule(plan)

    def schedule():
        return plan_schedule(step)
    multiplied = config.backbone_lr_multiplier != 1.0
    classes = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
               "sgd": keras.optimizers.SGD}
    if config.optimizer not in classes:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    cls = classes[config.optimizer]
    if config.optimizer in ("adam", "adamw"):
        cls = _with_fused_update(cls)
    if multiplied:
        cls = _with_lr_multipliers(cls)
    if config.optimizer == "adam":
        optimizer = cls(learning_rate=schedule)
    elif config.optimizer == "adamw":
        optimizer = cls(learning_rate=schedule, weight_decay=config.weight_decay)
    else:
        optimizer = cls(learning_rate=schedule, momentum=config.momentum, nesterov=True,
                        weight_decay=config.weight_decay or None)
    if multiplied:
        optimizer.set_lr_multiplier(transfer.backbone_variables(model),
                                    config.backbone_lr_multiplier)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    if config.mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def learning_rate_of_step(plan: RunPlan, step: int) -> float:
    """The (head's) learning rate that training step `step` (1-based) applied. The optimizer's
    `learning_rate` after that step is already the next step's, so it is not reported."""
    return float(learning_rate_schedule(plan)(step - 1))
