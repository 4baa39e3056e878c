"""Each action of trainer/loop/actions.py built on its own and run in process on real pieces:
summary writers into a temporary folder (read back from the event files), a tiny Keras model,
real checkpoints, real JPEG files, the real profiler and a real signal handler. Each action is
given only its narrow context, never a RunState; the controller around them is
tests/test_controller.py's (the non-finite guard and early stopping through the controller are
tested there)."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.util import event_pb2

from tests.controller_parts import counting_controller, small_state
from trainer.errors import Interrupted, Interrupts
from trainer.loop import actions, train
from trainer.loop.actions import Action
from trainer.loop.ema import WeightAverage
from trainer.loop.runner import LoopResult
from trainer.loop.step import Metrics, StepFunctions
from trainer.report import summaries
from trainer.state import checkpoints
from trainer.tools import analysis

pytestmark = pytest.mark.quick


def _result(first_step: int, losses, batch_ids=None) -> LoopResult:
    losses = np.asarray(losses, np.float64)
    ids = np.zeros((len(losses), 0), np.int64) if batch_ids is None else np.asarray(batch_ids)
    return LoopResult(first_step, len(losses), losses, seconds=0.01, input_seconds=None,
                      metrics={"loss": float(losses.mean()), "accuracy": 0.5}, batch_ids=ids)


def _events(folder: Path) -> dict[str, dict[int, np.ndarray]]:
    """tag -> step -> the summary's tensor, from every event file in `folder`."""
    found: dict[str, dict[int, np.ndarray]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = tf.make_ndarray(value.tensor)
    return found


def _png_shape(image_summary: np.ndarray) -> tuple[int, ...]:
    """An image summary's tensor is [width, height, png]: the decoded PNG's shape."""
    return tuple(tf.io.decode_png(image_summary[2]).shape)


def _backbone_model(seed: int = 3) -> keras.Model:
    """A backbone layer and the head (models/builders.py's HEAD, "logits")."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="hidden"),
                             keras.layers.Dense(3, name="logits")])


# --- per-step tables ----------------------------------------------------------------------------
def test_the_step_tables_append_each_loop_and_after_a_resume_the_last_line_counts(tmp_path):
    losses = actions.StepLossLog(str(tmp_path / "step_losses.tsv"))
    ids = actions.BatchIdsLog(str(tmp_path / "batch_ids.tsv"))
    for action in (losses, ids):
        action.after_loop(_result(1, [1.5, 1.25, 1.0, 0.75], [[3, 1], [0, 2], [7, 6], [5, 4]]))
        # A restart from the checkpoint of step 2 trains steps 3 and 4 again, differently.
        action.after_loop(_result(3, [0.9, 0.8125], [[6, 7], [4, 5]]))
    assert len((tmp_path / "step_losses.tsv").read_text().splitlines()) == 6
    assert actions.StepLossLog.read(losses.path) == {1: 1.5, 2: 1.25, 3: 0.9, 4: 0.8125}
    assert actions.BatchIdsLog.read(ids.path) == {1: [3, 1], 2: [0, 2], 3: [6, 7], 4: [4, 5]}
    # Nine significant digits: the losses read back as the float32 values they were.
    losses.after_loop(_result(5, [np.float32(1 / 3)]))
    assert np.float32(actions.StepLossLog.read(losses.path)[5]) == np.float32(1 / 3)


# --- histograms ---------------------------------------------------------------------------------
def test_histograms_write_the_weights_and_the_mean_gradient_norm_then_reset_it(tmp_path):
    writers = summaries.Summaries(str(tmp_path))
    model, gradient_norm = _backbone_model(), keras.metrics.Mean(name="gradient_norm")
    histograms = actions.Histograms(writers, gradient_norm, model)
    for norm in (2.0, 4.0):  # the steps of one loop
        gradient_norm.update_state(norm)
    histograms.after_loop(_result(1, [1.0] * 7))
    assert float(gradient_norm.result()) == 0.0  # reset: the next loop's mean is its own
    model.get_layer("hidden").trainable = False  # a frozen backbone: the head's alone
    gradient_norm.update_state(1.0)
    histograms.after_loop(_result(8, [1.0] * 3))
    writers.flush()
    events = _events(tmp_path / "train")
    assert {step: float(v) for step, v in events["train/gradient_norm"].items()} == \
        {7: 3.0, 10: 1.0}
    weights = {tag: steps for tag, steps in events.items() if tag.startswith("weights/")}
    assert {tag: sorted(steps) for tag, steps in weights.items()} == {
        f"weights/{v.path}": ([7, 10] if "logits" in v.path else [7])
        for v in model.weights}
    kernel = weights[f"weights/{model.get_layer('logits').kernel.path}"][7]
    assert kernel[:, 2].sum() == 5 * 3  # a histogram of the 15 values of the head kernel
    assert not _events(tmp_path / "eval")


# --- the profiler window ------------------------------------------------------------------------
def _traces(logdir: Path) -> list[Path]:
    return list(logdir.glob("plugins/profile/*/*.xplane.pb"))


@pytest.mark.parametrize("window,loops,stops_after", [
    ((6, 8), [(1, 5), (6, 10), (11, 15)], 10),  # inside one loop
    ((4, 7), [(1, 5), (6, 10), (11, 15)], 10),  # across two loops: from the first's start
    ((15, 15), [(1, 5), (6, 10), (11, 15)], 15),  # the last step
])
def test_the_profiler_traces_the_loops_that_cover_the_window(tmp_path, window, loops,
                                                              stops_after):
    profile = actions.ProfileWindow(window, str(tmp_path))
    active = []
    try:
        for first, last in loops:
            profile.before_loop(first, last)
            tf.reduce_sum(tf.ones([64, 64]))  # something to trace
            active.append(profile.active)
            profile.after_loop(_result(first, [1.0] * (last - first + 1)))
            if last == stops_after:
                assert not profile.active and len(_traces(tmp_path)) == 1
    finally:
        profile.close()
    assert active == [first <= window[1] and last >= window[0] for first, last in loops]
    assert len(_traces(tmp_path)) == 1


def test_the_profiler_never_starts_off_the_chief_and_a_run_ending_in_the_window_stops_it(
        tmp_path):
    off_chief = actions.ProfileWindow((1, 3), None)
    off_chief.before_loop(1, 5)
    assert not off_chief.active
    unset = actions.ProfileWindow(None, str(tmp_path / "unset"))
    unset.before_loop(1, 5)
    assert not unset.active
    cut = actions.ProfileWindow((4, 30), str(tmp_path / "cut"))
    cut.before_loop(1, 5)
    cut.after_loop(_result(1, [1.0] * 5))
    assert cut.active  # step 30 not reached: the trace goes on
    cut.close()  # the run ends (stopped, failed): the profiler is stopped and the trace kept
    assert not cut.active and len(_traces(tmp_path / "cut")) == 1
    assert not (tmp_path / "unset").exists()


# --- the evaluation figures ---------------------------------------------------------------------
def test_the_evaluation_figures_go_to_the_eval_writer_from_the_evaluations_pass(tmp_path):
    writers = summaries.Summaries(str(tmp_path))
    names = ["ant", "bee", "cat"]
    figures = actions.EvalFigures(writers, names)
    labels = np.array([0, 1, 2, 2, 1])
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]] * 4  # image 3 (a cat) seen as an ant
    gallery = np.full((1, 8, 8, 3), 200, np.uint8)
    figures.after_evaluation("valid", 5, {}, analysis.Predictions(
        [], labels, logits, np.array([3]), gallery))
    right = np.eye(3, dtype=np.float32)[labels]
    figures.after_evaluation("test", 6, {}, analysis.Predictions(
        [], labels, right, np.zeros(0, np.int64), np.zeros((0, 8, 8, 3), np.uint8)))
    writers.flush()
    events = _events(tmp_path / "eval")
    assert sorted(events) == ["test/confusion_matrix", "valid/confusion_matrix",
                              "valid/misclassified"]  # no gallery without a misclassified
    assert sorted(events["valid/confusion_matrix"]) == [5]
    assert sorted(events["test/confusion_matrix"]) == [6]
    for tag in events:
        height, width, channels = _png_shape(next(iter(events[tag].values())))
        assert height > 100 and width > 100 and channels == 4
    assert not _events(tmp_path / "train")


# --- the high-loss gallery ----------------------------------------------------------------------
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def _colour_files(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Noisy solid-colour JPEGs, 5 per class, and 3 mislabelled ones (red and blue images
    labelled green or red): files, labels, and the mislabelled files."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    files, labels, mislabelled = [], [], []
    names = list(COLOURS)
    planted = [("red", "green"), ("red", "green"), ("blue", "red")]
    items = [(name, name) for name in names for _ in range(5)] + planted
    for i, (colour, label) in enumerate(items):
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 8, (16, 16, 3)), 0, 255)
        path = str(folder / f"{i:02d}_{colour}_as_{label}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
        files.append(path)
        labels.append(names.index(label))
        if colour != label:
            mislabelled.append(path)
    return files, labels, mislabelled


def _colour_model() -> tuple[keras.Model, WeightAverage]:
    """A model whose weight averages tell the colours apart (the logit of a class is its
    channel's mean) while its own weights say the opposite: the gallery must use the
    averages (the evaluated weights) to find the mislabelled images."""
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, name="logits")])
    model.get_layer("logits").set_weights([np.eye(3, dtype=np.float32) * 0.05,
                                           np.zeros(3, np.float32)])
    average = WeightAverage(model, 0.9)  # the averages start as the model's weights
    model.get_layer("logits").set_weights([np.eye(3, dtype=np.float32) * -0.05,
                                           np.zeros(3, np.float32)])
    return model, average


def test_the_high_loss_gallery_shows_the_mislabelled_images_on_valid_only(tmp_path):
    files, labels, mislabelled = _colour_files(tmp_path / "images")
    model, average = _colour_model()
    writers = summaries.Summaries(str(tmp_path / "run"))
    gallery = actions.HighLossGallery(actions.HighLossContext(
        model=model, averaged=average.applied, files=files, labels=np.asarray(labels),
        class_names=list(COLOURS), image_size=16, eval_crop=1.0, batch_size=8,
        writers=writers))
    gallery.after_evaluation("test", 3, {}, None)
    gallery.after_evaluation("valid", 4, {}, None)
    writers.flush()
    events = _events(tmp_path / "run" / "train")
    assert sorted(events) == ["train/high_loss", "train/high_loss_files"]
    assert sorted(events["train/high_loss"]) == [4]  # the valid evaluation's step only
    rows = [row.split(" | ") for row in
            events["train/high_loss_files"][4].item().decode().splitlines()[2:]]
    assert len(rows) == actions.HighLossGallery.SHOWN
    assert sorted(row[0].lstrip("| ") for row in rows[:3]) == sorted(mislabelled)
    assert sorted((row[1], row[2]) for row in rows[:3]) == [  # (label, prediction)
        ("green", "red"), ("green", "red"), ("red", "blue")]
    losses = [float(row[3].rstrip(" |")) for row in rows]
    assert losses == sorted(losses, reverse=True) and losses[2] > 2 > losses[3]
    height, width, _ = _png_shape(events["train/high_loss"][4])
    assert width > height > 200  # a grid of 4 columns, 3 rows
    # Outside the block the model has its own weights again.
    np.testing.assert_array_equal(model.get_layer("logits").kernel.numpy(),
                                  np.eye(3, dtype=np.float32) * -0.05)


def test_the_high_loss_sample_is_seeded_sorted_and_all_when_asked_for_more(tmp_path):
    from data import layout
    split = layout.SplitFiles("train", tuple(f"f{i}" for i in range(10)), tuple(range(10)))
    files, labels = actions.high_loss_sample(split, 4, seed=1)
    assert labels.tolist() == [int(f[1:]) for f in files]  # each file with its own label
    assert files == sorted(files, key=lambda f: int(f[1:])) and len(set(files)) == 4
    assert actions.high_loss_sample(split, 4, seed=1)[0] == files  # the same each evaluation
    assert actions.high_loss_sample(split, 4, seed=2)[0] != files
    assert actions.high_loss_sample(split, 100, seed=1)[0] == list(split.files)


# --- the best checkpoint and early stopping ------------------------------------------------------
def test_track_best_keeps_the_best_valid_checkpoint_and_names_the_early_stop(tmp_path):
    model = _backbone_model()
    best = checkpoints.BestCheckpoint(str(tmp_path / "best"), tf.train.Checkpoint(model=model),
                                      metric="valid/loss")
    now = {"step": 0}
    stopping = actions.EarlyStopping(best, patience=2, start=15,
                                     current_step=lambda: now["step"])
    track = actions.TrackBest(stopping)
    for split, step, loss in (("test", 5, 0.1), ("valid", 10, 1.0), ("test", 12, 0.01),
                              ("valid", 14, 1.5), ("valid", 20, 1.2)):
        now["step"] = step
        track.after_evaluation(split, step, {"loss": loss, "accuracy": 0.5}, None)
        assert track.stop_reason() is None
    # The test split never counts; 14 came before the start (15): only 20 without a better.
    assert best.state["step"] == 10 and best.evaluations_since_best == 1
    assert sorted(p.name for p in (tmp_path / "best").iterdir())[0] == "best.json"
    now["step"] = 25
    track.after_evaluation("valid", 25, {"loss": 1.1, "accuracy": 0.5}, None)
    assert track.stop_reason() == (
        "early stopping at step 25: valid/loss has not improved for 2 evaluations "
        "(--early_stopping_patience=2, counted from step 15); best checkpoint: step 10 "
        "(valid loss 1.0000)")
    no_patience = actions.TrackBest(actions.EarlyStopping(best, 0, 0, lambda: 99))
    assert no_patience.stop_reason() is None
    assert actions.describe_early_stopping(stopping, "warmup", 100) == (
        "early stopping after 2 valid evaluations without a better valid/loss, counted from "
        "step 15 (--early_stopping_start=warmup: the end of the warmup)")
    assert actions.describe_early_stopping(stopping, "15", 12).endswith(
        "(--early_stopping_start=15); the run ends at step 12 before that")


def test_the_trainers_early_stopping_context_reads_the_live_step_and_the_resolved_start(
        tmp_path):
    state = small_state(tmp_path, early_stopping_patience=3, early_stopping_start="0.5")
    stopping = train.early_stopping_context(state)
    assert (stopping.patience, stopping.best) == (3, state.best)
    assert stopping.start == state.plan.early_stopping_start("0.5") > 0
    state.step.assign(7)
    assert stopping.current_step() == 7


# --- the non-finite guard (one rollback, the stop and the misspelt hook: test_controller) -------
def test_a_second_rollback_skips_the_batches_of_both_failed_loops(tmp_path):
    """--on_nan=rollback twice, through the trainer's own context (train.non_finite_context):
    the first failed loop (5-8) skips 4 batches; the second (11-14) ends at data position
    14 + 4 = 18, back to step 10: 8 skipped in all, not the 4 of step 14 - step 10."""
    state = small_state(tmp_path, total_steps=16, checkpoint_every=1)
    poisoned = set()

    def loss(step):  # NaN at steps 7 and 11, the first time each is trained
        if step in (7, 11) and step not in poisoned:
            poisoned.add(step)
            return np.nan
        return 1.0
    controller, runner = counting_controller(state, [], train_loss=loss)
    controller.actions.insert(0, actions.NonFiniteGuard(
        train.non_finite_context(state, runner), "rollback"))
    controller.train()
    assert runner.loops == [(1, 4), (5, 4), (5, 4), (9, 2), (11, 4), (11, 4), (15, 2)]
    assert int(state.skipped_batches.numpy()) == 8 and int(state.rollbacks.numpy()) == 2
    assert runner.input_restarts == 2 and state.position == 16 + 8


# --- backbone freezing --------------------------------------------------------------------------
ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")


def _steps(model: keras.Model) -> StepFunctions:
    """The real step functions of `model` (built outside any scope: one device)."""
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    return StepFunctions(ONE_DEVICE, model, optimizer, global_batch_size=4,
                         train_metrics=Metrics.create("train"),
                         eval_metrics=Metrics.create("eval", 3))


def _trainable(model: keras.Model) -> dict[str, bool]:
    return {layer.name: layer.trainable for layer in model.layers}


def test_the_backbone_is_frozen_until_its_step_and_no_loop_crosses_it(tmp_path):
    model = _backbone_model()
    steps = _steps(model)
    freeze = actions.BackboneFreeze(model, steps.retrace, freeze_steps=6)
    seen = []

    class Record(Action):
        def before_loop(self, first_step, last_step):
            seen.append((first_step, last_step, _trainable(model)["hidden"],
                         steps.train_loop))

    state = small_state(tmp_path, total_steps=12, steps_per_loop=4, eval_every=10)
    controller, runner = counting_controller(state, [freeze, Record()])
    controller.train()
    assert runner.loops == [(1, 4), (5, 2), (7, 4), (11, 2)]  # cut at 6 (and the eval at 10)
    assert [s[:3] for s in seen] == [(1, 4, False), (5, 6, False), (7, 10, True),
                                     (11, 12, True)]
    assert _trainable(model)["logits"]
    # Retraced when it froze and when it unfroze, not in between (the functions read the
    # trainable variables when traced).
    functions = [s[3] for s in seen]
    assert functions[0] is functions[1] and functions[1] is not functions[2]
    assert functions[2] is functions[3]


def test_a_frozen_backbone_trains_only_the_head_and_a_run_ending_frozen_unfreezes(tmp_path):
    model = _backbone_model()
    steps = _steps(model)
    freeze = actions.BackboneFreeze(model, steps.retrace, freeze_steps=100)
    freeze.at_loop_start(0)
    assert _trainable(model) == {"hidden": False, "logits": True}
    assert freeze.limit(0, 10) == 10 and freeze.limit(96, 10) == 4
    before = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(4, 4)).astype("float32"), np.array([0, 1, 2, 0], "int32"),
             np.ones(4, "float32"))
    dataset = tf.data.Dataset.from_tensors(batch).repeat(2)
    steps.train_loop(iter(ONE_DEVICE.experimental_distribute_dataset(dataset)), tf.constant(2))
    after = model.get_weights()
    np.testing.assert_array_equal(after[0], before[0])  # hidden kernel
    assert not np.array_equal(after[2], before[2])  # the head's kernel trained
    freeze.before_finish()  # the final model is saved trainable
    assert _trainable(model) == {"hidden": True, "logits": True} and not freeze.frozen
    freeze.close()
    assert _trainable(model)["hidden"]
    # A run resumed past the unfreezing step never freezes (nor retraces).
    resumed = actions.BackboneFreeze(model, steps.retrace, freeze_steps=6)
    function = steps.train_loop
    resumed.at_loop_start(8)
    assert _trainable(model)["hidden"] and steps.train_loop is function
    assert resumed.limit(8, 10) == 10


# --- the stop signal ----------------------------------------------------------------------------
@contextlib.contextmanager
def _restored_handlers():
    saved = {sig: signal.getsignal(sig) for sig in Interrupts.SIGNALS}
    try:
        yield saved
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_in_the_loop_is_a_stop_request_and_close_restores_the_handlers():
    interrupts = Interrupts()
    with _restored_handlers() as before:
        stop = actions.StopSignal(tf.distribute.get_strategy(), 1, interrupts)
        assert interrupts.installed
        assert stop.stop_requested(here_only=False) is None
        # The handler is ours (else the signal would end pytest): a real SIGTERM, deferred.
        assert signal.getsignal(signal.SIGTERM) == interrupts._handle
        signal.raise_signal(signal.SIGTERM)
        assert interrupts.received == [signal.SIGTERM]
        assert stop.stop_requested(here_only=False) == "signal 15"
        assert stop.stop_requested(here_only=True) == "signal 15"
        stop.close()
        assert not interrupts.installed and interrupts.received == []
        assert {sig: signal.getsignal(sig) for sig in Interrupts.SIGNALS} == before


def test_with_the_handler_installed_before_close_ends_only_the_deferral():
    """trainer.main installs the handler first: StopSignal leaves it, and after `close` a
    signal abandons the phase at once (Interrupted) instead of waiting for a loop's end."""
    interrupts = Interrupts()
    with _restored_handlers():
        interrupts.install(force_second=False)
        stop = actions.StopSignal(tf.distribute.get_strategy(), 1, interrupts)
        stop.close()
        assert interrupts.installed
        assert signal.getsignal(signal.SIGINT) == interrupts._handle
        with pytest.raises(Interrupted, match="signal 2"):
            signal.raise_signal(signal.SIGINT)
        interrupts.uninstall()
