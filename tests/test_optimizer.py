"""trainer/loop/optimization.py's fused Adam/AdamW update (TensorFlow's ResourceApplyAdam kernel)
against Keras 3's own update, on two replicas: the same weights and slots within float
tolerance, the same on both replicas, and the fused kernel really in the step's graph."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.loop.optimization import _with_fused_update

pytestmark = pytest.mark.quick


def _train(strategy, optimizer_class, steps=5, **options):
    """A small Dense model trained `steps` steps on two replicas; its weights, the optimizer's
    variables, the model and the step function."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                                  keras.layers.Dense(3)])
        optimizer = optimizer_class(learning_rate=0.05, **options)
        optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 5)).astype(np.float32), np.arange(8) % 3
    iterator = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()))

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, model(images)), global_batch_size=8)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    step = tf.function(lambda: strategy.run(replica_step, args=next(iterator)))
    for _ in range(steps):
        step()
    values = [np.array(v) for v in model.trainable_variables + optimizer.variables]
    return values, model, step


@pytest.mark.parametrize("name,options", [("Adam", {}), ("AdamW", {"weight_decay": 0.1})])
def test_fused_adam_matches_keras_on_two_replicas(two_replicas, name, options):
    keras_class = getattr(keras.optimizers, name)
    expected, _, _ = _train(two_replicas, keras_class, **options)
    fused, model, step = _train(two_replicas, _with_fused_update(keras_class), **options)
    assert len(fused) == len(expected)
    for got, want in zip(fused, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float rounding
    assert not np.allclose(fused[0], _train(two_replicas, keras_class, steps=0)[0][0])  # it moved
    for variable in model.trainable_variables:  # every replica holds the same weights
        first, second = (np.array(v) for v in variable.value._values)
        np.testing.assert_array_equal(first, second)
    assert "ResourceApplyAdam" in _graph_op_types(step)


def _graph_op_types(function) -> set[str]:
    graph = function.get_concrete_function().graph
    return {op.type for op in graph.get_operations()} | {
        op.type for inner in graph._functions.values() for op in inner.graph.get_operations()}


@pytest.mark.parametrize("optimizer_name,fused", [("adam", True), ("adamw", True),
                                                  ("sgd", False)])
def test_the_trainers_adam_and_adamw_use_the_fused_kernel(two_replicas, demo_dir,
                                                         optimizer_name, fused):
    from trainer import flags as trainer_flags
    from trainer.config import RunPlan
    from trainer.loop.optimization import make_optimizer
    config = trainer_flags.config_from_argv([
        f"--data_dir={demo_dir}", "--model_dir=/tmp/unused", f"--optimizer={optimizer_name}",
    ] + ([] if optimizer_name == "adam" else ["--weight_decay=0.01"]))
    with two_replicas.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        optimizer = make_optimizer(config, RunPlan.make(config, 1, 100), model,
                                   tf.Variable(0, dtype=tf.int64))

    def replica_step():
        gradients = [tf.ones_like(v) for v in model.trainable_variables]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    step = tf.function(lambda: two_replicas.run(replica_step))
    step()
    assert ("ResourceApplyAdam" in _graph_op_types(step)) == fused
