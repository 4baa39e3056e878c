"""The outer loop (issue 14): finishing that a restart completes, --on_nan=rollback, resume
changes refused or accepted, one step counter under float16, and the cross-replica state
(BatchNorm statistics, weight averages) after a loop."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer, start_trainer
from tests.file_events import wait_for_entry
from trainer.config import Config, RunPlan
from trainer.loop import resume
from trainer.loop.actions import StepLossLog
from trainer.loop.ema import WeightAverage
from trainer.loop.optimization import RunSchedule, learning_rate_of_step, make_optimizer
from trainer.loop.step import Metrics, StepFunctions

# small_demo_dir: 10 steps per epoch, so 20 steps cross an epoch and a checkpoint, and the
# finishing evaluations are short.
FINISH_FLAGS = (*FAST_DEMO_FLAGS[:-1], "--steps_per_loop=10", "--train_steps=20",
                "--checkpoint_every_steps=10", "--deterministic", "--export_at_end",
                "--distribution_strategy=one_device")
FINAL_OUTPUTS = ("results.json", "model.keras", "export/20/saved_model.pb",
                 "export/20/model.keras")


@pytest.fixture(scope="module")
def uninterrupted(small_demo_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("whole") / "run"
    run_trainer(f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}", *FINISH_FLAGS)
    return json.loads((model_dir / "results.json").read_text())


def _signal_in_export(model_dir, data_dir, sig) -> int:
    """Start the run, send `sig` as soon as the export's staging folder (`.tmp-*`, one this
    start made) appears after the "final test:" line; the exit code. The kernel reports the
    folder (tests/file_events.py), no polling."""
    export = model_dir / "export"
    before = set(os.listdir(export)) if export.exists() else set()
    process = start_trainer(f"--data_dir={data_dir}", f"--model_dir={model_dir}", *FINISH_FLAGS,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("final test:"):
            staged = wait_for_entry(export, lambda name: name.startswith(".tmp-"), timeout=120,
                                    alive=lambda: process.poll() is None, ignore=before)
            assert staged is not None, "the export's staging folder never appeared"
            process.send_signal(sig)
            break
    for _ in process.stdout:
        pass
    return process.wait(timeout=120)


# A SIGTERM in the loop (save, exit 75) is test_controller's stop test in process, and
# test_multiworker's and test_sweep's with processes; the stops at each point of finishing
# (between outputs, a SIGINT in the export) are test_finish's, in process. Here, with real
# processes: a SIGKILL in the export (its staging folder left behind), then a Ctrl-C in the
# restart's export, which must exit 75 (not be swallowed: exit 0) without results.json.
def test_a_restart_completes_the_finishing_phase(small_demo_dir, tmp_path, uninterrupted):
    model_dir = tmp_path / "run"
    assert _signal_in_export(model_dir, small_demo_dir, signal.SIGKILL) == -signal.SIGKILL
    assert not (model_dir / "results.json").exists()
    assert _signal_in_export(model_dir, small_demo_dir, signal.SIGINT) == 75
    assert not (model_dir / "results.json").exists()
    again = run_trainer(f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}",
                        *FINISH_FLAGS)
    assert "is finished" not in again.stdout
    for name in FINAL_OUTPUTS:
        assert (model_dir / name).exists(), name
    results = json.loads((model_dir / "results.json").read_text())
    assert results["steps"] == 20
    assert results["splits"] == uninterrupted["splits"]
    # A fourth start finds the run finished and trains nothing.
    fourth = run_trainer(f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}",
                         *FINISH_FLAGS)
    assert "is finished (20 of 20 steps)" in fourth.stdout
    runs = [json.loads(line) for line in (model_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["exit"] for r in runs][:3] == [None, "preempted", "finished"]  # None: killed


def test_rollback_skips_a_poisoned_batch_and_finishes(small_demo_dir, tmp_path):
    model_dir = tmp_path / "run"
    flags = (f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}", *FAST_DEMO_FLAGS,
             "--train_steps=30", "--checkpoint_every_steps=5", "--noeval_figures",
             "--noexport_at_end", "--high_loss_scan=0", "--distribution_strategy=one_device",
             "--debug_nan_batches=12")  # data position 12 is step 13 (loop 11-15)
    stopped = run_trainer(*flags, check=False)
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "trainer: non-finite training loss at step 13; stopped without saving this loop")
    assert "Traceback" not in stopped.stderr

    result = run_trainer(*flags, "--on_nan=rollback")
    assert ("non-finite training loss at step 13: rolled back to ckpt-" in result.stdout and
            "(step 10) and skipped the batches to data position 15" in result.stdout)
    assert "step 30/30" in result.stdout
    assert json.loads((model_dir / "results.json").read_text())["steps"] == 30
    losses = StepLossLog.read(model_dir / "step_losses.tsv")
    assert sorted(losses) == list(range(1, 31)) and all(np.isfinite(list(losses.values())))
    state = tf.train.get_checkpoint_state(str(model_dir / "checkpoints"))
    for path in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.all(np.isfinite(value)), (path, name)
    final = tf.train.load_checkpoint(state.model_checkpoint_path)
    assert final.get_tensor("skipped_batches/.ATTRIBUTES/VARIABLE_VALUE") == 5
    assert final.get_tensor("rollbacks/.ATTRIBUTES/VARIABLE_VALUE") == 1


# ---- resume changes --------------------------------------------------------------------------
CHANGES = {"model": "small_resnet", "image_size": 40, "optimizer": "sgd", "batch_size": 16,
           "scale_batch": True, "epochs": 3.0, "train_steps": 99, "base_lr": 0.5,
           "scale_lr": True, "warmup_epochs": 0.0, "seed": 5, "weight_decay": 0.1,
           "momentum": 0.5, "clip_grad_norm": 1.0, "label_smoothing": 0.1, "mixup_alpha": 0.2,
           "cutmix_alpha": 0.2, "randaugment": "2,9", "crop_min_area": 0.5,
           "random_flip": False, "grad_accum_steps": 2, "backbone_lr_multiplier": 0.1,
           "freeze_backbone_epochs": 1.0, "ema_decay": 0.9, "mixed_precision": "bfloat16",
           "class_weight": "balanced", "balanced_sampling": True, "eval_crop": 0.875,
           "early_stopping_start": "2epochs", "synthetic_data": True}


@pytest.mark.parametrize("name", sorted(set(resume.FIXED) | set(resume.CHANGEABLE)))
def test_each_change_is_refused_in_one_line_or_accepted(name):
    saved = Config(model="resnet50", ema_decay=0.5)
    changed = Config(**{**saved.__dict__, name: CHANGES[name]})
    with pytest.raises(resume.ResumeError) as refused:
        resume.check_config(saved.__dict__, changed, [], "runs/x")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--{name}=")
    assert f"used {saved.__dict__[name]}" in message
    if name in resume.CHANGEABLE:
        assert resume.check_config(saved.__dict__, changed, [name], "runs/x") == [name]
        assert f"--allow_change={name}" in message
    else:
        assert "new --model_dir" in message


def test_switching_averages_or_float16_is_refused_even_when_allowed():
    saved = Config().__dict__
    for name, value in (("ema_decay", 0.9), ("mixed_precision", "float16")):
        with pytest.raises(resume.ResumeError, match="new --model_dir"):
            resume.check_config(saved, Config(**{**saved, name: value}), [name], "runs/x")


def test_an_extended_run_goes_on_without_a_learning_rate_jump(small_demo_dir, tmp_path):
    model_dir = tmp_path / "run"
    flags = (f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}", *FAST_DEMO_FLAGS,
             "--noeval_figures", "--noexport_at_end", "--high_loss_scan=0",
             "--distribution_strategy=one_device", "--warmup_epochs=0.1")
    first = start_trainer(*flags, "--train_steps=40", "--checkpoint_every_steps=5",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stopped_at = None
    for line in first.stdout:
        if line.startswith("epoch ") and " step 20/40 " in line:
            first.send_signal(signal.SIGTERM)
        if line.startswith("stopped by signal"):
            stopped_at = int(line.split(" at step ")[1].split(":")[0])
    assert first.wait(timeout=120) == 75 and 20 <= stopped_at < 40
    refused = run_trainer(*flags, "--train_steps=80", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"trainer: --train_steps=80 but the run in '{model_dir}' used 40; pass "
        f"--allow_change=train_steps to accept it (the schedule is re-planned), or use a new "
        f"--model_dir")
    extended = run_trainer(*flags, "--train_steps=80", "--allow_change=train_steps")
    saved_plan = RunPlan.make(Config(batch_size=32, base_lr=0.003, warmup_epochs=0.1,
                                     train_steps=40), 1, 320)  # small_demo_dir's train images
    rate = float(RunSchedule(saved_plan)(stopped_at))
    assert (f"--train_steps changed (--allow_change): the run ends at step 80 (was 40); the "
            f"learning rate at step {stopped_at} is {rate:.4g} (was to be {rate:.4g}) and "
            f"decays on a cosine to 0 at step 80") in extended.stdout
    plan = json.loads((model_dir / "plan.json").read_text())
    assert plan["total_steps"] == 80 and plan["decay_from_step"] == stopped_at
    # The logged rates after the resume: from the old rate, down to 0 at step 80, no jump up.
    lines = [line.split() for line in extended.stdout.splitlines() if line.startswith("epoch ")]
    rates = [float(parts[parts.index("lr") + 1]) for parts in lines]
    assert rates[0] <= rate and rates == sorted(rates, reverse=True) and rates[-1] < rate / 100
    assert json.loads((model_dir / "config.json").read_text())["train_steps"] == 40
    runs = [json.loads(line) for line in (model_dir / "runs.jsonl").read_text().splitlines()]
    assert [(r["start_step"], r["end_step"], r["exit"], r["config"]["train_steps"])
            for r in runs] == [(0, stopped_at, "preempted", 40),
                               (stopped_at, 80, "finished", 80)]


# ---- one step counter (float16) --------------------------------------------------------------
def test_float16_skipped_steps_advance_the_schedule_and_the_logged_rate(two_replicas):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config = Config(mixed_precision="float16", batch_size=4, base_lr=0.1, train_steps=10,
                        warmup_epochs=0)
        plan = RunPlan.make(config, 2, 40)
        with two_replicas.scope():
            keras.utils.set_random_seed(3)
            model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1000.0),
                                      keras.layers.Flatten(),
                                      keras.layers.Dense(3, dtype="float32")])
            step = tf.Variable(0, dtype=tf.int64, trainable=False,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            optimizer = make_optimizer(config, plan, model, step)
        steps = StepFunctions(two_replicas, model, optimizer, global_batch_size=4,
                              train_metrics=Metrics.create("a"), eval_metrics=Metrics.create("b"),
                              step=step)
        images = np.full((4, 4, 4, 3), 255.0, "float32")  # overflows float16: skipped
        batch = (images, np.array([0, 1, 2, 0], "int32"), np.ones(4, "float32"))
        dataset = tf.data.Dataset.from_tensors(batch).repeat()
        steps.train_loop(iter(two_replicas.experimental_distribute_dataset(dataset)),
                         tf.constant(3))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(step.numpy()) == 3 and int(optimizer.iterations.numpy()) == 0
    schedule = RunSchedule(plan)
    # The rate the optimizer applies next is the schedule at step 3, not at its iteration 0.
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(3)))
    assert learning_rate_of_step(plan, 3) == pytest.approx(float(schedule(2)))


# ---- cross-replica state after a loop --------------------------------------------------------
def _bn_model():
    keras.utils.set_random_seed(11)
    return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 3, name="conv"),
                             keras.layers.BatchNormalization(momentum=0.5, name="bn"),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="logits")])


def _two_replica_loop(strategy, model, images, labels, num_steps, **options):
    with strategy.scope():
        optimizer = keras.optimizers.SGD(learning_rate=options.pop("lr", 0.0))
        optimizer.build(model.trainable_variables)
    steps = StepFunctions(strategy, model, optimizer, global_batch_size=len(labels),
                          train_metrics=Metrics.create("a"), eval_metrics=Metrics.create("b"),
                          **options)
    dataset = tf.data.Dataset.from_tensors((images, labels, np.ones(len(labels), "float32")))
    iterator = iter(strategy.experimental_distribute_dataset(dataset.repeat()))
    return steps, iterator, optimizer


def test_batchnorm_statistics_are_the_mean_of_the_replicas_after_a_loop(two_replicas):
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (8, 4, 4, 3)).astype("float32")
    images[4:] *= 0.1  # replica 1's half has other statistics than replica 0's
    labels = rng.integers(0, 3, 8).astype("int32")
    expected = []
    for half in (images[:4], images[4:]):  # what each replica computes on its own
        alone = _bn_model()
        alone(half, training=True)
        expected.append([np.array(v) for v in alone.get_layer("bn").non_trainable_variables])
    with two_replicas.scope():
        model = _bn_model()
    steps, iterator, _ = _two_replica_loop(two_replicas, model, images, labels, 1)
    steps.train_loop(iterator, tf.constant(1))
    for variable, mine, theirs in zip(model.get_layer("bn").non_trainable_variables, *expected):
        copies = [np.array(c) for c in two_replicas.experimental_local_results(variable.value)]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(copies[0], (mine + theirs) / 2, rtol=1e-5)
        assert not np.allclose(mine, theirs)


def test_weight_averages_follow_the_decay_formula_on_two_replicas(two_replicas):
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (8, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, 8).astype("int32")
    with two_replicas.scope():
        model = _bn_model()
        average = WeightAverage(model, decay=0.9)
    steps, iterator, optimizer = _two_replica_loop(two_replicas, model, images, labels, 1,
                                                   lr=0.05, weight_average=average)
    expected = [np.array(v) for v in model.trainable_variables]
    for _ in range(4):
        steps.train_loop(iterator, tf.constant(1))
        t = float(optimizer.iterations.numpy())
        decay = min(0.9, (1 + t) / (10 + t))
        expected = [decay * e + (1 - decay) * np.array(v)
                    for e, v in zip(expected, model.trainable_variables)]
    assert int(optimizer.iterations.numpy()) == 4
    for got, want in zip(average.averages, expected):
        for copy in two_replicas.experimental_local_results(got):
            np.testing.assert_allclose(np.array(copy), want, rtol=1e-5, atol=1e-6)
