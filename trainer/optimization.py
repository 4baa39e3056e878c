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


def make_optimizer(config: Config, plan: RunPlan) -> keras.optimizers.Optimizer:
    schedule = learning_rate_schedule(plan)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum,
                                         nesterov=True, weight_decay=config.weight_decay or None)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    if config.mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(inner.learning_rate)
