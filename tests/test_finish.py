"""The finishing phase (trainer/loop/finish.py) in process: one evaluation pass per split and
the calibration from it, results.json last and atomic, a restart that gives the same results,
the best checkpoint's weights after early stopping, a stop signal between outputs, the export,
and a worker that is not the chief.

All but the two export tests are in the quick tier (an export takes seconds).

The pieces are the trainer's own: a RunState from run_state.create (small_resnet at 32 px,
one device), the real StepRunner over JPEG files in class folders, the real controller,
TrackBest and StopSignal actions, TensorBoard writers and checkpoints in tmp_path. Training is
not what is tested: `_train_to` moves the weights and the step counter as a loop would
(test_step covers the step itself).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data import datasets, decode, layout
from models import registry
from tests.controller_parts import quiet_reporter
from tests.file_events import wait_for_entry
from trainer.config import Config, RunPlan
from trainer.errors import Interrupts, Preempted
from trainer.loop import actions, finish, run_state, train
from trainer.loop.actions import Action
from trainer.loop.controller import Controller
from trainer.loop.inputs import Inputs
from trainer.loop.run_state import RunState
from trainer.loop.runner import StepRunner
from trainer.state import checkpoints, run_dir
from trainer.tools import analysis, calibration

CLASSES = ["blue", "green", "red"]
SPLIT_SIZES = {"train": 4, "valid": 5, "test": 4}  # images per class
LAST_STEP = 20
BEST_STEP = 10


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """32x32 JPEGs, noise with one colour channel raised per class; the last valid and test
    image of each class has the next class's colour (mislabelled), so a model gets some wrong
    and a temperature can be fitted."""
    root = tmp_path_factory.mktemp("finish_data")
    rng = np.random.default_rng(0)
    for split, count in SPLIT_SIZES.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8)
                colour = (label + 1) % 3 if split != "train" and i == count - 1 else label
                pixels[..., colour] += 120
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return str(root)


@pytest.fixture(scope="module")
def one_device():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def _state(model_dir, data_dir, strategy, *, splits=("valid", "test"), chief=True,
           work_dir=None, **options) -> RunState:
    """A new run's state as trainer/loop/train.py makes it (seeded, nothing restored), with
    the evaluation `splits` (fewer: a cheaper finish)."""
    defaults = dict(distribution_strategy="one_device", eval_figures=False,
                    export_at_end=False)
    config = Config(data_dir=data_dir, model_dir=str(model_dir), model="small_resnet",
                    image_size=32, batch_size=8, train_steps=LAST_STEP, high_loss_scan=0,
                    **{**defaults, **options})
    inputs = Inputs(CLASSES, layout.scan_split(data_dir, "train", CLASSES),
                    {split: layout.scan_split(data_dir, split, CLASSES) for split in splits},
                    source=datasets.FolderSource(data_dir))
    plan = dataclasses.replace(RunPlan.make(config, 1, len(inputs.train)),
                               cache_images="none", eval_cache="none")
    keras.utils.set_random_seed(config.seed)
    return run_state.create(config, plan, inputs, strategy, chief,
                            str(work_dir or model_dir), None, print)


def _train_to(state, step: int, seed: int) -> list[np.ndarray]:
    """Stands in for training up to `step`: moves every backbone weight (seeded noise), then
    fits the head to the train images by least squares, made overconfident (x3) so that the
    temperature fitted on valid lies inside its range, and differs from test's. Sets the step
    counter; returns the model's weights."""
    rng = np.random.default_rng(seed)
    head = state.model.get_layer("logits")
    for variable in state.model.trainable_variables:
        if not any(variable is w for w in head.weights):
            variable.assign(variable.numpy() + rng.normal(0, 0.2, variable.shape)
                            .astype("float32"))
    train = state.inputs.train
    images = np.stack([decode.read_for_eval(f, 32, 1.0).numpy() for f in train.files])
    features = keras.Model(state.model.inputs, head.input)([images]).numpy()
    features = np.concatenate([features, np.ones([len(features), 1])], axis=1)
    targets = 2 * np.eye(len(CLASSES))[list(train.labels)] - 1
    solution = 3 * np.linalg.lstsq(features, targets, rcond=None)[0]
    head.kernel.assign(solution[:-1].astype("float32"))
    head.bias.assign(solution[-1].astype("float32"))
    state.step.assign(step)
    return [w.copy() for w in state.model.get_weights()]


class RecordingRunner(StepRunner):
    """The real runner; records each evaluation and the predictions it returned."""

    def __init__(self, state):
        super().__init__(state)
        self.evaluations, self.returned = [], {}

    def evaluate(self, split: str):
        values, predictions = super().evaluate(split)
        self.evaluations.append((split, self.state.current_step))
        self.returned[split] = predictions
        return values, predictions


def _controller(state, extra_actions=()):
    runner = RecordingRunner(state)
    return Controller(state, runner, quiet_reporter(state),
                      [actions.TrackBest(train.early_stopping_context(state)),
                       *extra_actions]), runner


def _count_forward_passes(model) -> list:
    """A list that grows each time the model's Python code runs: once per trace of a
    tf.function that calls it, and on every eager call."""
    runs, call = [], model.call

    def counted(*args, **kwargs):
        runs.append(1)
        return call(*args, **kwargs)
    model.call = counted
    return runs


# ---- file events: what Python opens for writing and renames, in order ------------------------
_RECORDING: list | None = None
_HOOKED = False


def _audit(event: str, args) -> None:
    if _RECORDING is None:
        return
    if event == "open" and isinstance(args[0], str):
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if mode else \
            bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes:
            _RECORDING.append(("write", os.path.abspath(path)))
    elif event == "os.rename":  # (os.replace's event too)
        _RECORDING.append(("rename", os.path.abspath(args[0]), os.path.abspath(args[1])))


@contextlib.contextmanager
def _file_events():
    """The files Python code opens for writing, ("write", path), and renames, ("rename",
    source, target), inside the block, in order. What TensorFlow writes in C++ (checkpoints,
    event files, the SavedModel) is not seen."""
    global _RECORDING, _HOOKED
    if not _HOOKED:  # a hook cannot be removed: outside the block it returns at once
        sys.addaudithook(_audit)
        _HOOKED = True
    _RECORDING = []
    try:
        yield _RECORDING
    finally:
        _RECORDING = None


def _written_directly(events, path) -> bool:
    return ("write", os.path.abspath(path)) in events


def _renamed_onto(events, path) -> list[int]:
    path = os.path.abspath(path)
    return [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == path]


# ---- one finished run, read by the tests of items 1 and 2 ------------------------------------
@dataclasses.dataclass
class FinishedRun:
    model_dir: object
    state: RunState
    runner: RecordingRunner
    results: dict
    file_events: list  # what Python wrote and renamed under model_dir while finishing
    evaluations: list  # runner.evaluations when finishing ended
    forward_passes: list  # grows with each Python run of the model (see _count_forward_passes)
    passes_when_finished: int
    newest_file: str  # the file under model_dir modified last when finishing ended


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_dir, one_device) -> FinishedRun:
    """A run at its last step (20, a checkpoint at 15 before it), finished once."""
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    state = _state(model_dir, image_dir, one_device)
    _train_to(state, 15, seed=3)
    state.keeper.save(force=True)  # an earlier checkpoint: a restart must not stop there
    _train_to(state, LAST_STEP, seed=1)
    passes = _count_forward_passes(state.model)
    controller, runner = _controller(state)
    with _file_events() as events:
        results = finish.finish(controller, time.time())
    controller.close()
    files = [os.path.join(d, f) for d, _, names in os.walk(model_dir) for f in names]
    return FinishedRun(model_dir, state, runner, results,
                       [e for e in events if e[-1].startswith(str(model_dir))],
                       list(runner.evaluations), passes, len(passes),
                       max(files, key=os.path.getmtime))


# ---- 1. one evaluation pass per split; the calibration from it --------------------------------
@pytest.mark.quick
def test_each_split_is_evaluated_once_and_the_calibration_uses_those_logits(finished_run):
    run, results = finished_run, finished_run.results
    assert run.evaluations == [("valid", LAST_STEP), ("test", LAST_STEP)]
    # One trace of the evaluation step for both splits, and no other forward pass at all
    # (no second pass for the calibration or the figures).
    assert run.passes_when_finished == 1
    returned = run.runner.returned
    infer = analysis.inference_function(run.state.model)
    for split, predictions in returned.items():  # the runner's logits are the model's
        files = run.state.inputs.eval_splits[split]
        again = analysis.predict_split(run.state.model, files.files, files.labels,
                                       image_size=32, batch_size=8, gallery_size=0,
                                       infer=infer)
        np.testing.assert_array_equal(predictions.labels, again.labels)
        np.testing.assert_allclose(predictions.logits, again.logits, rtol=1e-5, atol=1e-5)
        report = analysis.make_report(again, CLASSES, split=split, step=LAST_STEP)
        assert results["splits"][split]["images"] == report.num_images == 3 * SPLIT_SIZES[split]
        assert results["splits"][split]["accuracy"] == pytest.approx(report.accuracy)
    valid = returned["valid"]
    temperature = calibration.fit_temperature(valid.logits, valid.labels)
    test = returned["test"]
    assert 1 < temperature < np.exp(4)  # fitted, inside its range...
    assert temperature != calibration.fit_temperature(test.logits, test.labels)  # ...valid's
    assert results["calibration"]["temperature"] == temperature
    for split, predictions in returned.items():
        assert results["calibration"][split] == calibration.calibration_report(
            predictions.logits, predictions.labels, temperature)


@pytest.mark.quick
def test_without_eval_figures_the_calibration_draws_no_figure(finished_run):
    """--noeval_figures (the finished run's): the calibration's numbers, but no reliability
    diagram (nor any other figure) in TensorBoard."""
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(
        str(finished_run.model_dir / "eval"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"valid/calibration/ece_before", "test/calibration/ece_after"} <= tags, tags
    assert not [tag for tag in tags if tag.endswith(("reliability_diagram", "confusion_matrix",
                                                     "misclassified"))], tags


@pytest.mark.quick
def test_a_second_evaluation_does_not_trace_again(finished_run):
    """The evaluation step is one tf.function per model (StepFunctions._eval_batch): traced
    once for every split and every later pass of the same batch shape."""
    run = finished_run
    before = len(run.forward_passes)  # (other tests may have run the model too)
    values = {split: run.runner.evaluate(split)[0] for split in ("test", "valid")}
    assert len(run.forward_passes) == before
    assert run.state.steps._eval_batch.experimental_get_tracing_count() == 1
    assert values == run.results["splits"]


@pytest.mark.quick
def test_a_reused_inference_function_traces_once_over_several_passes(image_dir):
    """trainer/tools/analysis.py: the function made once (as HighLossGallery does) serves every
    predict_split over the same model."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(len(CLASSES), name="logits")])
    files = layout.scan_split(image_dir, "valid", CLASSES)
    infer = analysis.inference_function(model)
    logits = [analysis.predict_split(model, files.files, files.labels, image_size=32,
                                     batch_size=8, gallery_size=0, infer=infer).logits
              for _ in range(3)]
    assert infer.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(logits[0], logits[2])


# ---- 2. results.json: last, atomic, the last step; a restart finishes the same way ----------
@pytest.mark.quick
def test_results_are_written_last_and_atomically_and_a_restart_gives_the_same(
        finished_run, image_dir, one_device):
    run, results = finished_run, finished_run.results
    path = run.model_dir / run_dir.RESULTS_FILE
    events = run.file_events
    assert not _written_directly(events, path)
    assert _renamed_onto(events, path) == [len(events) - 1]  # the last file written, renamed
    assert os.path.getmtime(run.newest_file) == os.path.getmtime(path)  # (TF's files too)
    assert json.loads(path.read_text()) == results
    assert results["steps"] == LAST_STEP and results["weights_step"] == LAST_STEP
    assert finish.finished_results(str(run.model_dir), LAST_STEP) == results
    assert finish.finished_results(str(run.model_dir), LAST_STEP + 10) is None  # extended

    # A restart (a new process: a new state from the latest checkpoint) finishes the same way.
    again = _state(run.model_dir, image_dir, one_device)
    assert again.keeper.restore_latest().endswith("ckpt-2")
    controller, _ = _controller(again)
    repeated = finish.finish(controller, time.time())
    for key in ("steps", "weights_step", "weights_sha256", "splits", "calibration",
                "best_checkpoint", "model_file"):
        assert repeated[key] == results[key], key


# ---- 3. early stopping: the best checkpoint's weights, or the last step's -------------------
def _stopped_early(model_dir, image_dir, strategy, record_best=True, **options):
    """A run whose best checkpoint is step 10 (unless not `record_best`) and which early
    stopping ended at step 20: (state, controller, runner, weights at 10, weights at 20).
    Valid only is evaluated, unless `splits` says otherwise."""
    options = {"splits": ("valid",), **options}
    state = _state(model_dir, image_dir, strategy, early_stopping_patience=1, **options)
    best = _train_to(state, BEST_STEP, seed=2)
    if record_best:  # (a value no later evaluation beats)
        assert state.best.update(BEST_STEP, 0.99, 0.99)
    last = _train_to(state, LAST_STEP, seed=1)
    controller, runner = _controller(state)
    controller.stopped_early = "early stopping at step 20: (the line of actions.TrackBest)"
    return state, controller, runner, best, last


def _assert_weights(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.quick
def test_after_early_stopping_every_output_holds_the_best_checkpoints_weights(
        tmp_path, image_dir, one_device):
    model_dir = tmp_path / "run"
    state, controller, runner, best, last = _stopped_early(model_dir, image_dir, one_device)
    results = finish.finish(controller, time.time())
    assert (results["steps"], results["weights_step"]) == (LAST_STEP, BEST_STEP)
    assert results["stopped"] == controller.stopped_early
    assert "best_checkpoint_error" not in results
    _assert_weights(state.model.get_weights(), best)
    _assert_weights(keras.models.load_model(model_dir / run_dir.MODEL_FILE).get_weights(), best)
    assert results["weights_sha256"] == finish.weights_digest(state.model)
    # The evaluations were of those weights...
    files = state.inputs.eval_splits["valid"]
    np.testing.assert_allclose(runner.returned["valid"].logits, analysis.predict_split(
        state.model, files.files, files.labels, image_size=32, batch_size=8,
        gallery_size=0).logits, rtol=1e-5, atol=1e-5)
    # ...while the final checkpoint keeps the last step's (a restart finishes the same way).
    restored = registry.build("small_resnet", len(CLASSES), 32)
    checkpoints.restore_objects(state.keeper.manager.latest_checkpoint, model=restored)
    _assert_weights(restored.get_weights(), last)


@pytest.mark.quick
@pytest.mark.parametrize("damage", ["missing", "unreadable", "another model's",
                                    "none recorded"])
def test_a_best_checkpoint_that_cannot_be_read_leaves_the_last_steps_weights(
        tmp_path, image_dir, one_device, damage):
    model_dir = tmp_path / "run"
    state, controller, _, _, last = _stopped_early(model_dir, image_dir, one_device, splits=(),
                                                   record_best=damage != "none recorded")
    best_dir = model_dir / run_dir.BEST_DIR
    for name in os.listdir(best_dir) if damage in ("missing", "unreadable") else ():
        if name.startswith(f"ckpt-{BEST_STEP}."):
            if damage == "missing":
                os.remove(best_dir / name)
            else:
                (best_dir / name).write_bytes(b"not a checkpoint")
    if damage == "another model's":  # 5 classes: all but the head's values fit (and are read)
        other = registry.build("small_resnet", 5, 32)
        tf.train.Checkpoint(model=other).write(str(best_dir / f"ckpt-{BEST_STEP}"))
    results = finish.finish(controller, time.time())
    assert results["weights_step"] == LAST_STEP
    assert results["best_checkpoint_error"].startswith(
        "the best checkpoint could not be restored: ")
    if damage == "none recorded":
        assert results["best_checkpoint_error"].endswith("no best checkpoint recorded")
    else:
        assert f"ckpt-{BEST_STEP}" in results["best_checkpoint_error"]
    _assert_weights(state.model.get_weights(), last)
    _assert_weights(keras.models.load_model(model_dir / run_dir.MODEL_FILE).get_weights(), last)


# ---- 4. a stop signal between outputs ---------------------------------------------------------
class SignalAtCheck(Action):
    """Sends this process a real SIGTERM at the controller's Nth stop check; the StopSignal
    after it in the action list reads it there."""

    def __init__(self, check: int):
        self.check, self.calls = check, 0

    def stop_requested(self, here_only: bool) -> str | None:
        self.calls += 1
        if self.calls == self.check:
            signal.raise_signal(signal.SIGTERM)
        return None


# The stop checks of finish.finish with valid the only split and --noexport_at_end, in order.
CHECKS = {1: "before the valid evaluation", 2: "before the calibration",
          3: "before model.keras", 4: "before results.json"}


@pytest.mark.quick
@pytest.mark.parametrize("check", sorted(CHECKS), ids=[CHECKS[c] for c in sorted(CHECKS)])
def test_a_stop_signal_between_outputs_stops_before_results(tmp_path, image_dir, one_device,
                                                            check, capsys):
    model_dir = tmp_path / "run"
    state = _state(model_dir, image_dir, one_device, splits=("valid",))
    _train_to(state, LAST_STEP, seed=1)
    stop = actions.StopSignal(one_device, 1, interrupts=Interrupts())
    controller, runner = _controller(state, [SignalAtCheck(check), stop])
    try:
        with _file_events() as events, pytest.raises(Preempted) as stopped:
            finish.finish(controller, time.time())
    finally:
        controller.close()  # the handler uninstalled, the signal forgotten
    assert f"stopped by signal {int(signal.SIGTERM)} while finishing at step {LAST_STEP}" \
        in capsys.readouterr().out
    assert stopped.value.step == LAST_STEP
    assert len(runner.evaluations) == (check > 1)
    assert not (model_dir / run_dir.RESULTS_FILE).exists()
    model_file = model_dir / run_dir.MODEL_FILE
    assert model_file.exists() == (check == 4)
    # model.keras only ever appears whole: written under another name, then renamed.
    assert not _written_directly(events, model_file)
    assert len(_renamed_onto(events, model_file)) == (check == 4)
    assert not [n for n in os.listdir(model_dir) if n.startswith(".") and "tmp" in n]


# ---- 5. the export ----------------------------------------------------------------------------
def test_the_export_is_written_under_the_last_step_with_the_calibrated_temperature(
        tmp_path, image_dir, one_device):
    """With early stopping, so the export holds the best checkpoint's weights too."""
    model_dir = tmp_path / "run"
    state, controller, runner, best, _ = _stopped_early(model_dir, image_dir, one_device,
                                                        export_at_end=True)
    results = finish.finish(controller, time.time())
    export_dir = model_dir / run_dir.EXPORT_DIR / str(LAST_STEP)
    assert results["export_dir"] == str(export_dir)
    assert os.listdir(model_dir / run_dir.EXPORT_DIR) == [str(LAST_STEP)]  # nothing staged left
    assert (export_dir / "saved_model.pb").exists()
    sidecar = json.loads((export_dir / "calibration.json").read_text())
    assert sidecar["temperature"] == results["calibration"]["temperature"]
    _assert_weights(keras.models.load_model(export_dir / "model.keras").get_weights(), best)
    # The signature's probabilities are softmax(logits / T) of the evaluation's logits.
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    files = state.inputs.eval_splits["valid"].files
    out = serve(images=tf.constant([open(f, "rb").read() for f in files]))
    expected = calibration.softmax(runner.returned["valid"].logits, sidecar["temperature"])
    np.testing.assert_allclose(out["probabilities"][:, 0].numpy(), expected.max(axis=1),
                               atol=1e-4)


def test_a_signal_during_the_export_is_not_swallowed(tmp_path, image_dir, one_device, capsys):
    """A real SIGINT (Ctrl-C) sent while the export's staging folder exists: the export ends
    whole under its version, then the phase stops (Preempted: exit code 75) without
    results.json, so a restart finishes the run."""
    model_dir = tmp_path / "run"
    state = _state(model_dir, image_dir, one_device, splits=("valid",), export_at_end=True)
    _train_to(state, LAST_STEP, seed=1)
    stop = actions.StopSignal(one_device, 1, interrupts=Interrupts())
    controller, _ = _controller(state, [stop])
    main, finishing, sent = threading.main_thread().ident, threading.Event(), []

    def signal_when_staged():
        if wait_for_entry(model_dir / run_dir.EXPORT_DIR, lambda name: name.startswith(".tmp-"),
                          timeout=120, alive=lambda: not finishing.is_set()):
            sent.append(signal.SIGINT)
            signal.pthread_kill(main, signal.SIGINT)
    watcher = threading.Thread(target=signal_when_staged)
    watcher.start()
    try:
        with pytest.raises(Preempted):
            finish.finish(controller, time.time())
    finally:
        finishing.set()
        watcher.join()
        controller.close()  # only now the handler is uninstalled: no signal can come later
    assert sent and f"stopped by signal {int(signal.SIGINT)} while finishing" in \
        capsys.readouterr().out
    assert not (model_dir / run_dir.RESULTS_FILE).exists()
    assert os.listdir(model_dir / run_dir.EXPORT_DIR) == [str(LAST_STEP)]
    assert (model_dir / run_dir.EXPORT_DIR / str(LAST_STEP) / "saved_model.pb").exists()


# ---- 6. a worker that is not the chief --------------------------------------------------------
@pytest.mark.quick
def test_a_worker_that_is_not_the_chief_returns_results_and_writes_no_outputs(
        tmp_path, image_dir, one_device):
    model_dir, scratch = tmp_path / "run", tmp_path / "worker"
    state = _state(model_dir, image_dir, one_device, splits=("valid",), chief=False,
                   work_dir=scratch, export_at_end=True)
    _train_to(state, LAST_STEP, seed=1)
    controller, runner = _controller(state)
    results = finish.finish(controller, time.time())
    assert runner.evaluations == [("valid", LAST_STEP)]
    assert results["steps"] == LAST_STEP and set(results["splits"]) == {"valid"}
    assert results["weights_sha256"] == finish.weights_digest(state.model)
    assert not {"calibration", "model_file", "export_dir"} & set(results)
    for folder in (model_dir, scratch):
        for name in (run_dir.RESULTS_FILE, run_dir.MODEL_FILE, run_dir.EXPORT_DIR):
            assert not (folder / name).exists(), folder / name


@pytest.mark.quick
def test_model_keras_is_fsynced_before_its_rename_and_the_folder_after(
        tmp_path, image_dir, one_device, monkeypatch):
    state = _state(tmp_path / "run", image_dir, one_device, splits=("valid",))
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = finish._save_model_file(state)
    model_dir = str(tmp_path / "run")
    rename = next(e for e in events if e[0] == "rename" and e[2] == path)
    at = events.index(rename)
    assert ("fsync", rename[1]) in events[:at], events  # the whole file before its name
    assert ("fsync", model_dir) in events[at + 1:], events  # then the name itself
