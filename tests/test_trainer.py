"""The trainer core: the distributed step, evaluation counts, a real demo run, events."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from data import datasets, decode, layout
from data.augment import Augment
from data.spec import InputSpec
from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer
from trainer.loop.precision import detect_hardware, resolve_precision
from trainer.loop.step import Metrics, StepFunctions


def _bn_free_model(num_classes: int, seed: int) -> keras.Model:
    """BatchNorm statistics are per replica, so replica-count equivalence is tested without BN."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 127.5, offset=-1),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_classes, kernel_regularizer=keras.regularizers.L2(1e-3)),
    ])


def _train_few_steps(strategy, split, num_steps: int, global_batch: int):
    with strategy.scope():
        model = _bn_free_model(10, seed=3)
        optimizer = keras.optimizers.SGD(learning_rate=0.1)
        optimizer.build(model.trainable_variables)
        metrics = Metrics.create("train"), Metrics.create("eval")
    steps = StepFunctions(strategy, model, optimizer, global_batch_size=global_batch,
                          train_metrics=metrics[0], eval_metrics=metrics[1])
    initial = [w.copy() for w in model.get_weights()]

    def dataset_fn(context):
        return datasets.train_dataset(split.files, split.labels, InputSpec(
            32, global_batch, augment=Augment(crop_min_area=1.0, flip=False)), context,
            total_steps=num_steps)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    losses, *_ = steps.train_loop(iterator, tf.constant(num_steps))
    losses = losses.numpy()
    return initial, model.get_weights(), losses, metrics[0].results()


@pytest.mark.quick
def test_one_and_two_replicas_agree_and_report_the_true_loss(demo_dir, two_replicas):
    split = layout.scan_split(str(demo_dir), "train", layout.train_class_names(str(demo_dir)))
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = two_replicas
    assert two.num_replicas_in_sync == 2
    init1, weights1, losses1, metrics1 = _train_few_steps(one, split, 4, 32)
    init2, weights2, losses2, metrics2 = _train_few_steps(two, split, 4, 32)
    for a, b in zip(init1, init2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights1, weights2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(init1[-1], weights1[-1])  # the steps did train
    np.testing.assert_allclose(losses1, losses2, rtol=1e-5)
    # The metric is the true mean over all 4 global batches, not divided by the replica count.
    assert metrics2["loss"] == pytest.approx(float(np.mean(losses2)), rel=1e-5)
    assert metrics2["images"] == 4 * 32

    # Step 1's reported loss equals the cross-entropy of the initial model on the first batch.
    first = datasets.train_dataset(split.files, split.labels, InputSpec(
        32, 32, augment=Augment(crop_min_area=1.0, flip=False)), total_steps=1)
    images, labels, _ = next(iter(first))
    model = _bn_free_model(10, seed=3)
    model.set_weights(init1)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, model(images))
    assert losses2[0] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.quick
def test_37_images_over_two_replicas_are_evaluated_exactly_once(demo_dir, two_replicas):
    names = layout.train_class_names(str(demo_dir))
    split = layout.scan_split(str(demo_dir), "valid", names)
    files, labels = split.files[:37], split.labels[:37]
    strategy = two_replicas
    with strategy.scope():
        model = _bn_free_model(10, seed=1)
        optimizer = keras.optimizers.SGD()
        eval_metrics = Metrics.create("eval")
    steps = StepFunctions(strategy, model, optimizer, global_batch_size=8,
                          train_metrics=Metrics.create("t"), eval_metrics=eval_metrics)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: datasets.eval_dataset(files, labels, InputSpec(32, 8), ctx))
    steps.eval_loop(dataset)
    results = eval_metrics.results()
    assert results["images"] == 37
    # Accuracy over exactly those 37 images, computed directly.
    images = np.stack([decode.decode_and_resize(tf.io.read_file(f), 32).numpy() for f in files])
    predicted = np.argmax(model(images).numpy(), axis=1)
    assert results["accuracy"] == pytest.approx(float(np.mean(predicted == np.array(labels))))


@pytest.fixture(scope="module")
def demo_run(demo_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs") / "demo"
    # --mixed_precision=auto as the configs use it: bfloat16 on CPUs with AVX512_BF16 or AMX.
    result = run_trainer(f"--data_dir={demo_dir}", f"--model_dir={model_dir}", *FAST_DEMO_FLAGS,
                         "--epochs=2", "--distribution_strategy=mirrored", "--cpu_devices=2",
                         "--mixed_precision=auto", "--sample_images")
    return model_dir, result


def test_demo_run_learns_and_writes_results(demo_run):
    model_dir, result = demo_run
    results = json.loads((model_dir / "results.json").read_text())
    assert results["splits"]["test"]["accuracy"] > 0.6, results  # chance is 0.1
    assert results["splits"]["test"]["images"] == 270
    assert results["num_replicas"] == 2
    loop_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in loop_lines]
    assert losses[-1] < 0.5 * losses[0], losses
    for word in ("step", "loss", "acc", "lr", "img/s", "ETA"):
        assert word in loop_lines[-1]
    assert result.stdout.strip().splitlines()[-1].endswith("results.json")
    assert (model_dir / "model.keras").exists()
    assert json.loads((model_dir / "classes.json").read_text())[:2] == ["eight", "five"]
    chosen = resolve_precision("auto")  # what auto picks on this machine, and why
    assert f"mixed precision: {chosen.describe()}" in result.stdout.splitlines()
    assert json.loads((model_dir / "plan.json").read_text())["precision"] == chosen.describe()
    assert json.loads((model_dir / "config.json").read_text())["mixed_precision"] == "auto"


def test_event_files_hold_scalars_images_and_config(demo_run):
    model_dir, _ = demo_run
    train = event_accumulator.EventAccumulator(
        str(model_dir / "train"), size_guidance={event_accumulator.TENSORS: 0})
    train.Reload()
    tags = set(train.Tags()["tensors"])
    for tag in ("train/loss", "train/accuracy", "train/top5_accuracy", "train/learning_rate",
                "train/images_per_second", "train/step_time_ms", "train/sample_images",
                "config"):
        assert tag in tags, (tag, tags)
    grid = train.Tensors("train/sample_images")[0]
    png = tf.make_ndarray(grid.tensor_proto)[2]  # [width, height, encoded image...]
    assert tf.io.decode_png(png).shape[0] > 200  # a 3x3 grid of titled images
    config_text = tf.make_ndarray(train.Tensors("config")[0].tensor_proto)
    assert b"small_resnet" in config_text.item()
    chosen = resolve_precision("auto")  # the config text says what auto chose and why
    assert chosen.describe().encode() in config_text.item()
    environment = tf.make_ndarray(train.Tensors("environment")[0].tensor_proto).item()
    assert chosen.policy.encode() in environment
    assert detect_hardware().describe().encode() in environment
    evals = event_accumulator.EventAccumulator(
        str(model_dir / "eval"), size_guidance={event_accumulator.TENSORS: 0})
    evals.Reload()
    assert {"valid/loss", "valid/accuracy", "test/accuracy"} <= set(evals.Tags()["tensors"])
    assert "train/images" not in tags


def test_ci_script_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "./run.sh test" in readme and "./run.sh test" in ci
    assert "rm -rf .venv" in ci  # a fresh environment every time
