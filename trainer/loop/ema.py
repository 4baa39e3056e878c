"""An exponential moving average of the model's weights (--ema_decay).

`WeightAverage` keeps one average per trainable variable of the model as it is built (before
any backbone freezing), in the strategy scope, so each replica holds its own copy. The train
loop calls `update` after every step, in cross-replica context; `strategy.extended.update` runs
the update on each replica's copy with that replica's weights (identical after the all-reduced
update), so averaging needs no communication.

    average <- d * average + (1 - d) * weight,   d = min(decay, (1 + t) / (10 + t))

with t the optimizer's update count: the warm-up keeps early averages from being dominated by
the random initial weights in short runs. The averages are in the checkpoint (`ema/averages/i`),
so a resumed run continues the same average. `applied()` swaps them into the model for
evaluation and export; state/checkpoints.py's `restore_model` loads them into a freshly built
model (the evaluate/export tools).
"""
from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from trainer.state.checkpoints import EmaAverages, tf_variable


class WeightAverage:
    def __init__(self, model: keras.Model, decay: float):
        """Create in the strategy scope, once the model holds its initial (or pretrained)
        weights: the averages start as a copy of them."""
        self.decay = float(decay)
        self.variables = list(model.trainable_variables)
        self.trackable = EmaAverages([
            tf.Variable(tf.convert_to_tensor(v), trainable=False,
                        name=f"ema_{i}") for i, v in enumerate(self.variables)])

    @property
    def averages(self) -> list[tf.Variable]:
        return self.trackable.averages

    def update(self, strategy: tf.distribute.Strategy, num_updates) -> None:
        """One averaging step (cross-replica context, inside the train loop's tf.function)."""
        t = tf.cast(num_updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))

        def step(average, weight):
            return average.assign(decay * average + (1.0 - decay) * tf.cast(weight, tf.float32))

        for average, variable in zip(self.averages, self.variables):
            strategy.extended.update(average, step, args=(tf_variable(variable),), group=False)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own weights again after
        it (eager, outside any tf.function)."""
        saved = [keras.ops.convert_to_numpy(v) for v in self.variables]
        try:
            for variable, average in zip(self.variables, self.averages):
                variable.assign(tf.cast(average.read_value(), variable.dtype))
            yield
        finally:
            for variable, value in zip(self.variables, saved):
                variable.assign(value)
