"""Testing aids installed on the train step from their flags, outside its hot path.

--debug_nan_batches: `nan_at_positions` wraps the step's loss function so that the losses of the
batches at the given data positions are NaN (the tests of --on_nan). --debug_record_batches
needs nothing here: the training dataset then carries each image's id (data/datasets.py) and
the train loop returns them.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from trainer.loop.recipes import LossFn


def nan_at_positions(loss_fn: LossFn, positions: tuple[int, ...],
                     position: Callable[[], tf.Tensor]) -> LossFn:
    """`loss_fn` whose per-example losses are NaN when `position()` (the data position of the
    running step: step + skipped batches, read when the step runs) is one of `positions`, and
    unchanged (times 1) otherwise."""
    marked = tf.constant(positions, tf.int64)

    def poisoned(labels, logits, weights):
        hit = tf.reduce_any(tf.equal(position(), marked))
        return loss_fn(labels, logits, weights) * tf.where(hit, float("nan"), 1.0)
    return poisoned


def install(steps, config, step: tf.Variable, skipped_batches: tf.Variable) -> None:
    """The aids `config` asks for, on `steps` (a StepFunctions not yet traced)."""
    positions = tuple(int(b) for b in config.debug_nan_batches.split(",") if b)
    if positions:
        steps.loss_fn = nan_at_positions(steps.loss_fn, positions,
                                         lambda: step + skipped_batches)
