"""Optimizer and learning-rate schedule from a Config and RunPlan."""
from __future__ import annotations

import keras

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


def make_optimizer(config: Config, plan: RunPlan, backbone_variables=None
                   ) -> keras.optimizers.Optimizer:
    """The configured optimizer; with --backbone_lr_multiplier != 1, `backbone_variables` (all
    trainable variables but the head's) are updated at the multiplied learning rate."""
    schedule = learning_rate_schedule(plan)
    multiplied = getattr(config, "backbone_lr_multiplier", 1.0) != 1.0
    if multiplied and backbone_variables is None:
        raise ValueError("--backbone_lr_multiplier needs the backbone variables")
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
        optimizer.set_lr_multiplier(backbone_variables, config.backbone_lr_multiplier)
    if config.mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(inner.learning_rate)
