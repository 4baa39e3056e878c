"""Exact resume after SIGKILL (also during a checkpoint save), guards, cross-replica numerics,
and multi-worker training with two real processes on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer, start_trainer
from tests.file_events import wait_for_entry
from trainer.loop.step import Metrics, StepFunctions
from trainer.loop.actions import StepLossLog

# 30 steps over three epochs of 10 steps (small_demo_dir: 320 train images, global batch 32),
# so that the kills below fall in the second and third epochs.
EXACT_FLAGS = (*FAST_DEMO_FLAGS[:-1], "--steps_per_loop=2", "--train_steps=30",
               "--checkpoint_every_steps=4", "--eval_every_steps=12", "--deterministic",
               "--distribution_strategy=mirrored", "--cpu_devices=2", "--noeval_figures",
               "--noexport_at_end", "--high_loss_scan=0")


def _model_variables(checkpoint_dir) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/"))}


def _latest_step(checkpoint_dir) -> int:
    latest = tf.train.latest_checkpoint(str(checkpoint_dir))
    return int(tf.train.load_variable(latest, "step/.ATTRIBUTES/VARIABLE_VALUE")) if latest else 0


def _learning_rates(model_dir) -> dict[int, float]:
    acc = event_accumulator.EventAccumulator(
        str(model_dir / "train"), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto))
            for e in acc.Tensors("train/learning_rate")}


def _start(model_dir, *flags) -> subprocess.Popen:
    """The trainer at a lower priority (nice 10) than this test, so that the test's kill runs
    as soon as the kernel reports the file it waits for, even on a busy machine (at nice 5, on
    2 busy AVX2 cores, three kills in a row came after the save had finished)."""
    return start_trainer(f"--model_dir={model_dir}", *flags, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, nice=10)


def _kill_after_step(model_dir, flags, step: int) -> int:
    """SIGKILL as soon as the console reports `step`; returns the step reported."""
    process = _start(model_dir, *flags)
    for line in process.stdout:
        if line.startswith("epoch ") and int(line.split()[3].split("/")[0]) >= step:
            process.kill()
            seen = int(line.split()[3].split("/")[0])
            break
    assert process.wait(timeout=60) == -signal.SIGKILL
    return seen


def _kill_during_save(model_dir, flags, attempts: int = 5) -> None:
    """SIGKILL while a checkpoint's files are being written (its `ckpt-N_temp` folder exists):
    the kernel reports the folder's creation (tests/file_events.py), no polling. A kill that
    lands after the save finished (the temp folder is gone: a loaded machine can delay this
    process past a small model's save) proves nothing, so the next start tries again."""
    checkpoint_dir = model_dir / "checkpoints"

    def being_written(name: str) -> bool:
        return name.endswith("_temp") and not os.path.exists(
            checkpoint_dir / (name[:-len("_temp")] + ".index"))

    for _ in range(attempts):
        # A save an earlier kill interrupted left its folder: only this start's saves count.
        before = set(os.listdir(checkpoint_dir)) if checkpoint_dir.exists() else set()
        process = _start(model_dir, *flags)
        temp = wait_for_entry(checkpoint_dir, being_written, timeout=240,
                              alive=lambda: process.poll() is None, ignore=before)
        if temp is not None:
            process.kill()
        process.stdout.close()
        process.wait(timeout=60)
        assert temp is not None, "the run ended before a save could be interrupted"
        if (checkpoint_dir / temp).exists():  # killed mid-save
            latest = tf.train.latest_checkpoint(str(checkpoint_dir))
            assert not latest.endswith(temp[:-len("_temp")]), \
                "the interrupted save became the latest"
            return
    raise AssertionError(f"no kill in {attempts} starts landed while a save was being written")


def test_sigkill_three_times_resumes_bit_identical(small_demo_dir, tmp_path):
    flags = (f"--data_dir={small_demo_dir}", *EXACT_FLAGS)
    whole = tmp_path / "whole"
    run_trainer(f"--model_dir={whole}", *flags)

    parts = tmp_path / "parts"
    # Saves come after the first loop, then every 4 steps; a kill after the step-14 line
    # (epoch 2) leaves the steps since the last save to be trained again.
    first_kill = _kill_after_step(parts, flags, 13)
    assert 10 < first_kill < 20 and _latest_step(parts / "checkpoints") < first_kill
    _kill_during_save(parts, flags)
    after_save_kill = _latest_step(parts / "checkpoints")
    assert after_save_kill >= first_kill - 4
    third_kill = _kill_after_step(parts, flags, max(25, after_save_kill + 2))  # epoch 3
    assert third_kill > after_save_kill and third_kill > 20
    result = run_trainer(f"--model_dir={parts}", *flags)
    assert "resumed from" in result.stdout

    expected, actual = _model_variables(whole / "checkpoints"), _model_variables(
        parts / "checkpoints")
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    whole_losses = StepLossLog.read(whole / "step_losses.tsv")
    parts_losses = StepLossLog.read(parts / "step_losses.tsv")
    assert sorted(whole_losses) == list(range(1, 31))
    assert parts_losses == whole_losses
    whole_results = json.loads((whole / "results.json").read_text())
    parts_results = json.loads((parts / "results.json").read_text())
    assert parts_results["splits"] == whole_results["splits"]
    # The optimizer's own counter and the schedule continue too: every logged learning rate of
    # the resumed run is the uninterrupted run's, and each is the rate its step applied
    # (warmup 0.5 epochs = 5 steps: step k ran at peak * (k-1) / 5; the optimizer's own
    # `learning_rate` is already the next step's), the last one not yet the schedule's 0.
    ckpt = str(parts / "checkpoints")
    assert tf.train.load_variable(ckpt, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 30
    whole_rates = _learning_rates(whole)
    assert _learning_rates(parts) == whole_rates
    assert whole_rates[4] == pytest.approx(0.003 * 3 / 5, rel=1e-5)
    assert whole_rates[30] > 0


# Outputs these starts do not read are off; small_demo_dir: short finishing evaluations.
QUIET_FLAGS = ("--train_steps=4", "--distribution_strategy=one_device", "--noeval_figures",
               "--noexport_at_end", "--high_loss_scan=0")


def test_incompatible_restart_and_finished_run(small_demo_dir, tmp_path):
    demo_dir = small_demo_dir
    model_dir = tmp_path / "run"
    flags = (f"--data_dir={demo_dir}", f"--model_dir={model_dir}", *FAST_DEMO_FLAGS,
             *QUIET_FLAGS)
    run_trainer(*flags)
    again = run_trainer(*flags)
    assert "is finished (4 of 4 steps)" in again.stdout
    lines = again.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("epoch ", "final "))]  # no training

    changed = run_trainer(*flags, "--image_size=40", check=False)
    assert changed.returncode == 1
    assert changed.stderr.strip().splitlines()[-1] == (
        f"trainer: --image_size=40 but the run in '{model_dir}' used 32: the model was built "
        f"for that input size; use a new --model_dir")
    assert "Traceback" not in changed.stderr

    other_data = tmp_path / "data"
    (other_data / "train" / "zebra").mkdir(parents=True)
    for split in ("train", "valid"):
        for class_dir in (demo_dir / split).iterdir():
            (other_data / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for image in list(class_dir.iterdir())[:3]:
                (other_data / split / class_dir.name / image.name).write_bytes(image.read_bytes())
    zebra = next((demo_dir / "train" / "one").iterdir())
    (other_data / "train" / "zebra" / "z.jpg").write_bytes(zebra.read_bytes())
    classes = run_trainer(f"--data_dir={other_data}", f"--model_dir={model_dir}",
                          *FAST_DEMO_FLAGS, *QUIET_FLAGS, check=False)
    assert classes.returncode == 1
    assert "new ['zebra']" in classes.stderr.strip().splitlines()[-1]


# A non-finite loss with --on_nan=stop: test_controller (in process, the real NonFiniteGuard);
# with a real trainer and real NaN batches: test_loop's rollback test.


# ---- cross-replica numerics, in process ----------------------------------------------------
def _step_once(strategy, images, labels, *, clip=0.0, precision="float32", make_model):
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope():
            model = make_model()
            optimizer = keras.optimizers.SGD(learning_rate=1.0)
            if precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
        steps = StepFunctions(strategy, model, optimizer, global_batch_size=len(labels),
                              train_metrics=Metrics.create("a"), eval_metrics=Metrics.create("b"),
                              clip_grad_norm=clip)
        before = [w.copy() for w in model.get_weights()]
        weights = tf.ones(len(labels))
        dataset = tf.data.Dataset.from_tensors((images, labels, weights))
        dist = strategy.experimental_distribute_dataset(dataset)  # splits the global batch
        steps.train_loop(iter(dist), tf.constant(1))
        return before, model.get_weights(), optimizer
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _linear_model():
    keras.utils.set_random_seed(7)
    return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                             keras.layers.Dense(3)])


def test_clip_grad_norm_uses_the_global_norm_across_replicas(two_replicas):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, 8).astype("int32")
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = two_replicas
    before, clipped_one, _ = _step_once(one, images, labels, clip=0.5, make_model=_linear_model)
    _, clipped_two, _ = _step_once(two, images, labels, clip=0.5, make_model=_linear_model)
    _, unclipped, _ = _step_once(one, images, labels, make_model=_linear_model)
    for a, b in zip(clipped_one, clipped_two):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    update = np.concatenate([(a - b).ravel() for a, b in zip(clipped_one, before)])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-4)  # lr 1: update = clipped grad
    raw = np.concatenate([(a - b).ravel() for a, b in zip(unclipped, before)])
    assert np.linalg.norm(raw) > 1.0  # clipping did something


def _overflowing_model():
    """float16 overflows to inf for pixel values near 255 (x * 1000 > 65504)."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1000.0),
                             keras.layers.Flatten(), keras.layers.Dense(3, dtype="float32")])


def test_float16_overflow_on_one_replica_skips_the_step_on_all(two_replicas):
    labels = np.array([0, 1, 2, 0], "int32")
    images = np.zeros((4, 4, 4, 3), "float32")
    images[2:] = 255.0  # the second half of the global batch goes to replica 1 only
    two = two_replicas
    before, after, optimizer = _step_once(two, images, labels, precision="mixed_float16",
                                          make_model=_overflowing_model)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)  # skipped everywhere, nothing applied
    assert float(optimizer.dynamic_scale.numpy()) == pytest.approx(2.0 ** 15 / 2)
    # A finite batch is applied normally.
    before, after, optimizer = _step_once(two, np.zeros_like(images), labels,
                                          precision="mixed_float16",
                                          make_model=_overflowing_model)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
