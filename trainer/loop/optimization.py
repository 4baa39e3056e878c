"""Optimizer and learning-rate schedule from a Config and RunPlan."""
from __future__ import annotations

import keras

from models import transfer
from trainer.config import Config, RunPlan


def learning_rate_schedule(plan: RunPlan) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warmup from 0 to the peak rate, then cosine decay to 0 at the last step."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if plan.warmup_steps else plan.learning_rate,
        decay_steps=max(1, plan.total_steps - plan.warmup_steps),
        warmup_target=plan.learning_rate if plan.warmup_steps else None,
        warmup_steps=plan.warmup_steps)


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


def make_optimizer(config: Config, plan: RunPlan, model: keras.Model
                   ) -> keras.optimizers.Optimizer:
    """The configured optimizer, built for `model`'s trainable variables (call it in the
    strategy's scope). With --backbone_lr_multiplier != 1 the backbone (every trainable
    variable but the head's) is updated at the multiplied learning rate. --weight_decay leaves
    out one-dimensional variables (biases, normalisation scales and offsets), as timm and
    big_vision do: decaying them towards 0 only fights the normalisation."""
    schedule = learning_rate_schedule(plan)
    multiplied = config.backbone_lr_multiplier != 1.0
    classes = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
               "sgd": keras.optimizers.SGD}
    if config.optimizer not in classes:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    cls = classes[config.optimizer]
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
