"""The train step's recipes (trainer/loop/recipes.py) and the core step, in process, on a tiny
model: each transform against its formula, and the composed step against a hand-written one."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.loop import recipes, testing_aids
from trainer.loop.step import Metrics, StepFunctions


def _tiny_model(seed: int = 4) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                             keras.layers.Dense(3)])


def _batch(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n).astype("int32"),
            np.ones(n, "float32"))


@pytest.mark.quick
def test_the_loss_smooths_the_target_and_weighs_examples_and_classes():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 3)).astype("float32")
    labels = np.array([0, 1, 2, 2, 1, 0], "int32")
    weights = np.array([1, 1, 0, 1, 0.5, 1], "float32")
    class_weights = np.array([0.5, 2.0, 1.5])
    loss = recipes.make_loss(0.2, class_weights)
    smoothed = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.2, reduction=None)(np.eye(3)[labels], logits)
    np.testing.assert_allclose(loss(tf.constant(labels), logits, weights),
                               smoothed * weights * class_weights[labels], rtol=1e-5)
    # Soft targets weigh by their mix of the class weights.
    soft = np.array([[0.5, 0.5, 0.0]] * 6, "float32")
    mixed = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.2, reduction=None)(soft, logits)
    np.testing.assert_allclose(loss(tf.constant(soft), logits, weights),
                               mixed * weights * 1.25, rtol=1e-5)
    np.testing.assert_allclose(recipes.make_loss(0.2)(tf.constant(labels), logits, weights),
                               smoothed * weights, rtol=1e-5)
    plain = recipes.make_loss()(tf.constant(labels), logits, weights)
    np.testing.assert_allclose(plain, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)(labels, logits) * weights, rtol=1e-5)


def _micro_step(model, global_batch: int):
    loss_fn = recipes.make_loss(0.1)

    def micro_step(images, labels, weights, micro_batches=1,
                   unconnected=tf.UnconnectedGradients.NONE):
        with tf.GradientTape() as tape:
            per_example = loss_fn(tf.convert_to_tensor(labels), model(images), weights)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        return tape.gradient(loss, model.trainable_variables,
                             unconnected_gradients=unconnected), tf.reduce_sum(per_example)
    return micro_step


@pytest.mark.quick
def test_accumulation_over_two_micro_batches_is_the_whole_batch_gradient():
    model = _tiny_model()
    images, labels, weights = _batch(8)
    weights[5] = 0.0  # padding in the second micro-batch only
    micro_step = _micro_step(model, 8)
    whole, whole_loss = micro_step(images, labels, weights)
    accumulated = tf.function(recipes.accumulate(micro_step, 2,
                                                 lambda: model.trainable_variables))
    summed, summed_loss = accumulated(images, labels, weights)
    first, _ = micro_step(images[:4], labels[:4], weights[:4])
    assert not np.allclose(first[0], whole[0])  # each half alone differs from the whole
    for a, b in zip(summed, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(summed_loss) == pytest.approx(float(whole_loss), rel=1e-6)


def _per_replica_gradients(strategy, chain, values: list[list[np.ndarray]]):
    """Runs `chain` on each replica's gradients (values[r]); returns each replica's result."""
    def replica(index):
        tensors = [tf.constant(v) for v in values[0]]
        for r in range(1, len(values)):
            tensors = [tf.where(tf.equal(index, r), tf.constant(v), t)
                       for v, t in zip(values[r], tensors)]
        return chain(tensors)
    ids = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(context.replica_id_in_sync_group))
    outputs = tf.function(lambda: strategy.run(replica, args=(ids,)))()
    return [[np.array(t) for t in strategy.experimental_local_results(g)] for g in outputs]


@pytest.mark.quick
def test_clipping_bounds_the_global_norm_of_the_summed_gradient_across_replicas(two_replicas):
    """Replica 0 holds (3, 0) and (0,), replica 1 (1, 0) and (4,): the all-reduced gradient
    (4, 0, 4) has norm 5.66; clipped to 2, each replica is scaled by 2/5.66 (not by its own
    norm), and the mean of the recorded norm is the unclipped one."""
    with two_replicas.scope():
        norm_mean = keras.metrics.Mean()
    chain = recipes.gradient_chain(recipes.Recipe(clip_grad_norm=2.0),
                                   keras.optimizers.SGD(), norm_mean)
    values = [[np.array([3.0, 0.0], "float32"), np.array([0.0], "float32")],
              [np.array([1.0, 0.0], "float32"), np.array([4.0], "float32")]]
    kernel, bias = _per_replica_gradients(two_replicas, chain, values)
    total = np.sqrt(32.0)
    factor = 2.0 / total
    np.testing.assert_allclose(kernel, [[3 * factor, 0], [1 * factor, 0]], rtol=1e-6)
    np.testing.assert_allclose(bias, [[0], [4 * factor]], rtol=1e-6)
    summed = np.concatenate([kernel[0] + kernel[1], bias[0] + bias[1]])
    assert np.linalg.norm(summed) == pytest.approx(2.0, rel=1e-6)
    assert float(norm_mean.result()) == pytest.approx(total, rel=1e-6)
    # Under the limit nothing changes.
    small = recipes.gradient_chain(recipes.Recipe(clip_grad_norm=100.0), keras.optimizers.SGD())
    kernel, _ = _per_replica_gradients(two_replicas, small, values)
    np.testing.assert_array_equal(kernel, [[3, 0], [1, 0]])


@pytest.mark.quick
def test_an_overflow_on_one_replica_makes_every_replica_skip_the_step(two_replicas):
    with two_replicas.scope():
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    chain = recipes.gradient_chain(recipes.Recipe(), optimizer)
    values = [[np.array([1.0, 2.0], "float32")], [np.array([np.inf, 2.0], "float32")]]
    (kernel,) = _per_replica_gradients(two_replicas, chain, values)
    assert np.isnan(kernel).all(), kernel  # replica 0's finite gradient too
    finite = [[np.array([1.0, 2.0], "float32")], [np.array([3.0, 2.0], "float32")]]
    (kernel,) = _per_replica_gradients(two_replicas, chain, finite)
    np.testing.assert_array_equal(kernel, [[1, 2], [3, 2]])


@pytest.mark.quick
def test_the_composed_step_is_the_hand_written_step_with_every_recipe(two_replicas):
    """Two replicas, label smoothing, class weights, 2 micro-batches and clipping: one SGD step
    moves the weights by -lr * the clipped gradient of the weighted mean loss of the whole
    global batch, and the loop returns that loss."""
    images, labels, weights = _batch(8, seed=3)
    class_weights = np.array([0.5, 1.0, 3.0])
    loss_fn = recipes.make_loss(0.1, class_weights)
    reference = _tiny_model()
    with tf.GradientTape() as tape:
        per_example = loss_fn(tf.constant(labels), reference(images), weights)
        loss = tf.reduce_sum(per_example) / 8
    gradients = tape.gradient(loss, reference.trainable_variables)
    norm = float(tf.linalg.global_norm(gradients))
    clip = norm / 2  # clipping acts
    expected = [np.array(v) - 0.1 * np.array(g) * clip / norm
                for v, g in zip(reference.trainable_variables, gradients)]
    model, steps = _sgd_steps(two_replicas, recipe=recipes.Recipe(0.1, class_weights, 2, clip),
                              time_input=False)
    dataset = tf.data.Dataset.from_tensors((images, labels, weights))
    losses, _, ids = steps.train_loop(iter(two_replicas.experimental_distribute_dataset(
        dataset.repeat())), tf.constant(1))
    assert float(losses[0]) == pytest.approx(float(loss), rel=1e-5)
    assert ids.shape == (0, 0)
    for got, want in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.quick
def test_nan_at_positions_poisons_only_the_marked_data_positions():
    position = tf.Variable(0, dtype=tf.int64)
    loss_fn = testing_aids.nan_at_positions(recipes.make_loss(), (2, 5), lambda: position + 0)
    images, labels, weights = _batch(4)
    logits = _tiny_model()(images)
    labels = tf.constant(labels)
    clean = recipes.make_loss()(labels, logits, weights).numpy()
    compiled = tf.function(loss_fn)
    for value in range(7):
        position.assign(value)
        got = compiled(labels, logits, weights).numpy()
        if value in (2, 5):
            assert np.isnan(got).all()
        else:
            assert got.tobytes() == clean.tobytes()


@pytest.mark.quick
def _sgd_steps(strategy, **options):
    """A tiny model under SGD(0.1) in `strategy`'s scope and its steps at global batch 8."""
    with strategy.scope():
        model = _tiny_model()
        optimizer = keras.optimizers.SGD(learning_rate=0.1)
        optimizer.build(model.trainable_variables)
        metrics = Metrics.create("a"), Metrics.create("b")
    return model, StepFunctions(strategy, model, optimizer, global_batch_size=8,
                                train_metrics=metrics[0], eval_metrics=metrics[1], **options)


def test_the_loop_returns_the_image_ids_the_batches_carry_in_global_replica_order(two_replicas):
    """--debug_record_batches: the dataset carries ids (a fourth element); the step trains on
    the other three and the loop returns each step's ids, replica 0's half first."""
    images, labels, weights = _batch(8)
    model, steps = _sgd_steps(two_replicas, record_ids=True)
    ids = np.arange(16, dtype="int32").reshape(2, 8) + 100
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.stack([images] * 2), np.stack([labels] * 2), np.stack([weights] * 2), ids))
    losses, _, recorded = steps.train_loop(iter(two_replicas.experimental_distribute_dataset(
        dataset.unbatch().batch(8))), tf.constant(2))
    np.testing.assert_array_equal(recorded, ids)
    assert np.isfinite(losses.numpy()).all() and int(steps.optimizer.iterations.numpy()) == 2
