"""models/batchnorm.py: the fused BatchNormalization layer against Keras' own, the variance
convention of its moving average, its fallbacks, the swap in keras.applications models, and the
models built with and without it. Small inputs only (a ResNet50 is built eagerly, never traced)."""
from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import registry
from models.batchnorm import FusedBatchNormalization, swap_batchnorm
from tests.conftest import REPO
from tests.test_models import _per_replica_batches, _step_functions

CHANNELS = 5


def _pair(momentum=0.9, **options):
    """A stock and a fused layer with the same non-trivial weights."""
    stock = keras.layers.BatchNormalization(momentum=momentum, **options)
    fused = FusedBatchNormalization(momentum=momentum, **options)
    rng = np.random.default_rng(0)
    for layer in (stock, fused):
        layer.build((None, 6, 6, CHANNELS))
    values = [rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32) for _ in stock.weights]
    for layer in (stock, fused):
        layer.set_weights(values)
    return stock, fused


def _inputs(shape=(4, 6, 6, CHANNELS), dtype="float32"):
    x = np.random.default_rng(1).normal(3.0, 2.0, shape).astype(np.float32)
    return tf.cast(x, dtype)


@pytest.mark.quick
def test_fused_layer_has_the_stock_variables_and_matches_it_in_training_and_inference():
    keras.mixed_precision.set_global_policy("float32")
    stock, fused = _pair()
    assert [(v.path.split("/")[-1], v.shape, v.trainable) for v in fused.weights] == \
        [(v.path.split("/")[-1], v.shape, v.trainable) for v in stock.weights]
    assert [v.path.split("/")[-1] for v in fused.weights] == \
        ["gamma", "beta", "moving_mean", "moving_variance"]
    x = _inputs()
    assert fused.fused_applies(x)
    np.testing.assert_allclose(fused(x, training=False), stock(x, training=False),
                               rtol=1e-5, atol=1e-5)
    weights = tf.constant(np.random.default_rng(3).normal(size=x.shape), tf.float32)
    grads = []
    for layer in (stock, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * weights)  # (a sum of y alone has zero gradients)
        grads.append(tape.gradient(loss, [x, layer.gamma.value, layer.beta.value]))
        grads[-1].append(y)
    for got, want in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.quick
def test_moving_variance_follows_keras_population_convention_not_the_fused_ops_bessel():
    """The fused op returns the batch variance x n/(n-1); Keras 3 averages the population
    variance. The fused layer must hold what the stock layer holds."""
    keras.mixed_precision.set_global_policy("float32")
    stock, fused = _pair(momentum=0.5)
    before = fused.moving_variance.numpy().copy()
    x = _inputs()
    stock(x, training=True)
    fused(x, training=True)
    population = np.var(x.numpy(), axis=(0, 1, 2))
    n = 4 * 6 * 6
    np.testing.assert_allclose(fused.moving_variance.numpy(), 0.5 * before + 0.5 * population,
                               rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), stock.moving_variance.numpy(),
                               rtol=1e-5)
    bessel = 0.5 * before + 0.5 * population * n / (n - 1)
    assert not np.allclose(fused.moving_variance.numpy(), bessel, rtol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), stock.moving_mean.numpy(), rtol=1e-5)


@pytest.mark.quick
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_layer_keeps_low_precision_activations_under_a_mixed_policy(dtype):
    keras.mixed_precision.set_global_policy(f"mixed_{dtype}")
    try:
        stock, fused = _pair()
        x = _inputs(dtype=dtype)
        assert fused.fused_applies(x)
        for training in (True, False):
            got, want = fused(x, training=training), stock(x, training=training)
            assert got.dtype == dtype and fused.moving_mean.dtype == "float32"
            np.testing.assert_allclose(tf.cast(got, tf.float32), tf.cast(want, tf.float32),
                                       rtol=0.05, atol=0.05)
        np.testing.assert_allclose(fused.moving_variance.numpy(), stock.moving_variance.numpy(),
                                   rtol=0.02)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("options, shape", [
    ({}, (4, CHANNELS)),  # rank 2
    ({"axis": 1}, (4, CHANNELS, 6, 6)),  # channels first
    ({"renorm": True}, (4, 6, 6, CHANNELS)),
])
@pytest.mark.quick
def test_fused_layer_falls_back_to_keras_where_the_fused_op_does_not_apply(options, shape):
    keras.mixed_precision.set_global_policy("float32")
    axis = options.get("axis", -1)
    stock = keras.layers.BatchNormalization(momentum=0.5, **options)
    fused = FusedBatchNormalization(momentum=0.5, **options)
    x = _inputs(shape)
    assert not fused.fused_applies(x)
    for layer in (stock, fused):
        layer.build(shape)
    np.testing.assert_allclose(fused(x, training=True), stock(x, training=True), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), stock.moving_variance.numpy(),
                               rtol=1e-6)
    assert fused.moving_mean.shape == (shape[axis],)


@pytest.mark.quick
def test_a_frozen_fused_layer_runs_in_inference_mode_and_keeps_its_statistics():
    keras.mixed_precision.set_global_policy("float32")
    stock, fused = _pair()
    x = _inputs()
    fused.trainable = False
    before = [w.copy() for w in fused.get_weights()]
    np.testing.assert_allclose(fused(x, training=True), stock(x, training=False), rtol=1e-5,
                               atol=1e-5)
    for got, want in zip(fused.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def _bn_model(layer_class):
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(CHANNELS, 1, name="conv")(inputs)
    x = layer_class(momentum=0.5, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


@pytest.mark.quick
def test_two_replicas_average_the_fused_moving_statistics(two_replicas):
    """Each replica updates its own copy from its own batch; after the loop every copy holds
    the average (trainer/loop/step.py _average_model_state), with the population variance."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    images = np.concatenate([rng.normal(0, 1, (2, 4, 4, 3)), rng.normal(5, 3, (2, 4, 4, 3))])
    batch = (images.astype(np.float32), np.array([0, 1, 0, 1], np.int32), np.ones(4, np.float32))
    with two_replicas.scope():
        model = _bn_model(FusedBatchNormalization)
        optimizer = keras.optimizers.SGD(learning_rate=0.0)  # weights stay: stats checkable
        optimizer.build(model.trainable_variables)
    conv = model.get_layer("conv")
    features = [conv(batch[0][i:i + 2]).numpy() for i in (0, 2)]
    steps = _step_functions(two_replicas, model, optimizer, 4)
    steps.train_loop(_per_replica_batches(two_replicas, batch, 2), tf.constant(1))
    bn = model.get_layer("bn")
    want_mean = 0.5 * np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
    want_var = 0.5 + 0.5 * np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)
    for mean, var in zip(two_replicas.experimental_local_results(bn.moving_mean.value),
                         two_replicas.experimental_local_results(bn.moving_variance.value)):
        np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-4)


@pytest.mark.quick
def test_swap_keeps_names_weights_and_outputs():
    keras.mixed_precision.set_global_policy("float32")
    stock = _bn_model(keras.layers.BatchNormalization)
    stock.get_layer("bn").moving_mean.assign(np.full(CHANNELS, 0.7, np.float32))
    swapped = swap_batchnorm(stock)
    assert type(swapped.get_layer("bn")) is FusedBatchNormalization
    assert [w.path for w in swapped.weights] == [w.path for w in stock.weights]
    x = _inputs((3, 4, 4, 3))
    np.testing.assert_allclose(swapped(x, training=False), stock(x, training=False), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.quick
def test_every_model_uses_the_fused_layer_unless_asked_not_to():
    keras.mixed_precision.set_global_policy("float32")
    fused, stock = (registry.build("resnet50", 3, 32, fused_batchnorm=flag) for flag in (True,
                                                                                         False))

    def kinds(model):
        return {type(layer).__name__ for layer in _all_layers(model)}
    assert "BatchNormalization" not in kinds(fused) and "FusedBatchNormalization" in kinds(fused)
    assert "FusedBatchNormalization" not in kinds(stock)
    assert [(w.path, w.shape) for w in fused.weights] == [(w.path, w.shape) for w in stock.weights]
    small = registry.build("small_resnet", 3, 16)
    assert "BatchNormalization" not in kinds(small)


def _all_layers(model):
    for layer in model.layers:
        yield from (_all_layers(layer) if isinstance(layer, keras.Model) else [layer])


@pytest.mark.quick
def test_keras_file_with_fused_layers_loads_in_a_fresh_process(tmp_path):
    keras.mixed_precision.set_global_policy("float32")
    model = registry.build("small_resnet", 3, 16)
    path = tmp_path / "model.keras"
    model.save(path)
    x = _inputs((2, 16, 16, 3)).numpy() * 40 + 100
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", model(x, training=False).numpy())
    code = ("import numpy as np, keras, models.batchnorm; "
            f"m = keras.models.load_model({str(path)!r}); "
            f"got = m(np.load({str(tmp_path / 'x.npy')!r}), training=False); "
            "assert type(m.get_layer('stem_bn')).__name__ == 'FusedBatchNormalization'; "
            f"np.testing.assert_allclose(got, np.load({str(tmp_path / 'want.npy')!r}), "
            "rtol=1e-5, atol=1e-5)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# --xla under several replicas (trainer/loop/step.py compiles the forward/backward pass only)
# ---------------------------------------------------------------------------------------------
def _losses_and_weights(strategy, xla: bool):
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (16, 16, 16, 3)).astype(np.float32)
    batch = (images, (np.arange(16) % 3).astype(np.int32), np.ones(16, np.float32))
    with strategy.scope():
        model = registry.build("small_resnet", 3, 16)
        optimizer = keras.optimizers.Adam(learning_rate=1e-3)
        optimizer.build(model.trainable_variables)
    steps = _step_functions(strategy, model, optimizer, 8, xla=xla)
    losses, *_ = steps.train_loop(_per_replica_batches(strategy, batch, 4), tf.constant(2))
    steps.eval_metrics.reset()
    steps.eval_loop(strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensor_slices(batch).batch(4)))
    return losses.numpy(), model.get_weights(), steps.eval_metrics.results()


def test_xla_on_two_replicas_gives_the_losses_and_weights_of_the_plain_step(two_replicas):
    plain_losses, plain_weights, plain_eval = _losses_and_weights(two_replicas, xla=False)
    xla_losses, xla_weights, xla_eval = _losses_and_weights(two_replicas, xla=True)
    np.testing.assert_allclose(xla_losses, plain_losses, rtol=1e-4)
    for got, want in zip(xla_weights, plain_weights):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert xla_eval["images"] == plain_eval["images"] == 16
    np.testing.assert_allclose(xla_eval["loss"], plain_eval["loss"], rtol=1e-4)


@pytest.mark.quick
def test_the_input_timer_is_off_for_replicas_sharing_the_cpu_and_on_for_one(two_replicas):
    """The timer's control dependencies cost about 2x with 2 logical CPU replicas
    (docs/benchmarks.md); with one replica it measures the input wait exactly and stays on."""
    keras.mixed_precision.set_global_policy("float32")
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    for strategy, timed in ((two_replicas, False), (one, True)):
        with strategy.scope():
            model = _bn_model(FusedBatchNormalization)
            optimizer = keras.optimizers.SGD(learning_rate=0.0)
            optimizer.build(model.trainable_variables)
        steps = _step_functions(strategy, model, optimizer, 4, time_input=True)
        assert steps.time_input is timed
        batch = (np.zeros((8, 4, 4, 3), np.float32), np.zeros(8, np.int32), np.ones(8, np.float32))
        per_replica = 4 // strategy.num_replicas_in_sync  # two global batches of 4
        _, seconds, _ = steps.train_loop(_per_replica_batches(strategy, batch, per_replica),
                                         tf.constant(2))
        assert (float(seconds) > 0) is timed
