"""Checkpoints of model, optimizer and the run's counters (the latest K, and the best one).

Resume order: trainer/loop/train.py's module doc.
"""
from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from data.files import atomic_write_text, fsync_path
from trainer.config import BEST_METRICS
from trainer.state.run_dir import (BEST_STATE_FILE, RunError, SavedRun, latest_checkpoint,
                                   read_best)


def fsync_checkpoint(prefix: str) -> None:
    """fsync a checkpoint's index and data files and their folder: called before the
    `checkpoint` state file (or best.json) names it, so that a power loss cannot leave the
    newest published checkpoint with missing bytes (recovery.py handles one that has them)."""
    directory, base = os.path.split(prefix)
    for name in os.listdir(directory):
        if name == base + ".index" or name.startswith(base + ".data-"):
            fsync_path(os.path.join(directory, name))
    fsync_path(directory)


class CheckpointKeeper:
    """tf.train.CheckpointManager over model_dir/checkpoints.

    The CheckpointManager writes the checkpoint files first and the `checkpoint` state file
    last (atomically), so a kill during a save leaves the previous checkpoint the latest one;
    the files are fsynced before the state file names them (a write callback, which
    CheckpointManager runs before its own that records the state).
    """

    def __init__(self, directory: str, *, model, optimizer, step: tf.Variable,
                 max_to_keep: int, every_steps: int, ema=None, **counters: tf.Variable):
        # `ema`: the weight averages of --ema_decay (trainer/loop/ema.py), saved as
        # `ema/averages/i`; `counters`: the run's other int64 counters (skipped batches, ...).
        extra = {"ema": ema} if ema is not None else {}
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                              **extra, **counters)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=max_to_keep, step_counter=step,
            checkpoint_interval=every_steps)

    def restore_latest(self, directory: str | None = None) -> str | None:
        """Restore the newest checkpoint of `directory` (default: our own). Non-chief workers
        write to a scratch directory but resume from the chief's."""
        return self.restore(latest_checkpoint(directory) if directory
                            else self.manager.latest_checkpoint)

    def restore(self, path: str | None) -> str | None:
        """Restore checkpoint `path` (None: nothing); a failure is a one-line RunError."""
        if path:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (AssertionError, ValueError, IndexError, tf.errors.OpError) as e:
                text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise RunError(f"checkpoint {path} does not restore ({type(e).__name__}: "
                               f"{text})") from None
        return path

    def save(self, force: bool = False) -> str | None:
        """Saves when `every_steps` have passed since the last save, or always with force."""
        return self.manager.save(check_interval=not force, options=_FSYNC_FIRST)

    def save_at_end(self, step: int) -> str:
        """The final checkpoint, unless the latest one already holds this step."""
        latest = self.manager.latest_checkpoint
        if latest and SavedRun.checkpoint_step(latest) == step:
            return latest
        return self.manager.save(check_interval=False, options=_FSYNC_FIRST)


# CheckpointManager.save copies the options and appends its own callback (the state file).
_FSYNC_FIRST = tf.train.CheckpointOptions(experimental_write_callbacks=[fsync_checkpoint])


class CheckpointMismatch(ValueError):
    """A checkpoint lacks values for some of the objects asked for; str() is one line, `detail`
    TensorFlow's own first line."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class EmaAverages(tf.Module):
    """What a checkpoint holds of --ema_decay (`ema/averages/i`, trainer/loop/ema.py): only
    the list of averages, never the model's own weights."""

    def __init__(self, averages: list[tf.Variable]):
        super().__init__(name="ema")
        self.averages = averages


def tf_variable(variable):
    """The tf.Variable behind a Keras 3 variable (checkpoints and tf.distribute need it)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def restore_objects(path: str, **objects) -> None:
    """Restore `objects` (e.g. model=..., ema=...) from the checkpoint at `path`, one rule for
    all of them: every variable they hold must have a value there, and whatever else the
    checkpoint holds (optimizer slots, counters, the best-checkpoint record, the save counter
    that only CheckpointManager saves write) is left unread. `Checkpoint.read`, not `restore`:
    `restore` adds a save counter to the objects checked, and a best checkpoint written at the
    run's first evaluation, before the first CheckpointManager save, has none. Raises
    CheckpointMismatch (values may then be partly assigned)."""
    try:
        status = tf.train.Checkpoint(**objects).read(path)
        status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise CheckpointMismatch(f"checkpoint {path} does not hold every value of the "
                                 f"{' and '.join(objects)} ({first})", first) from None


def restore_model(run: SavedRun, path: str) -> keras.Model:
    """`run`'s model in float32 with the weights of checkpoint `path` (only the model is
    restored: the optimizer slots and step in the checkpoint are left unread). A run trained
    with --ema_decay gets the averaged weights, as its evaluations and export did."""
    from models import registry
    keras.mixed_precision.set_global_policy("float32")
    model = registry.build(run.model_name, len(run.class_names), run.image_size)
    try:
        restore_objects(path, model=model)
    except CheckpointMismatch as e:
        raise RunError(f"checkpoint {path} does not hold the weights of a {run.model_name} "
                       f"model with {len(run.class_names)} classes ({e.detail})") from None
    if float(run.config.get("ema_decay") or 0) > 0:
        try:
            # The averages restored straight into the model's own variables: a model built afresh
            # by the registry, nothing frozen, has them in the order the averages were made.
            restore_objects(path, ema=EmaAverages([tf_variable(v)
                                                   for v in model.trainable_variables]))
        except CheckpointMismatch as e:
            raise RunError(f"checkpoint {path} lacks the averaged weights of a run with "
                           f"--ema_decay ({e.detail})") from None
    return model


_SHORT = {"valid/accuracy": "valid acc", "valid/loss": "valid loss",
          "valid/balanced_accuracy": "valid bal acc"}


class BestCheckpoint:
    """The checkpoint with the best `metric` (--best_metric) so far, kept apart from the latest K
    (which CheckpointManager deletes as training goes on), and the count of evaluations since
    it that count (for --early_stopping_patience: those from --early_stopping_start on).

    `directory` (model_dir/checkpoints/best) holds `ckpt-<step>.index`, `ckpt-<step>.data-*` and
    `best.json` ({"step", "metric", "value", "valid_accuracy", "checkpoint"}). A new best is
    written under its own prefix first; then best.json is replaced atomically to point at it;
    only then are the older files deleted. A kill at any moment leaves best.json naming a
    complete checkpoint.

    The decisions are made from a record of variables (best step, value, metric, evaluations
    since) that this object adds to `checkpoint` as `best`: a resumed run restores the record
    of its own step with the latest checkpoint, so it decides (and stops early) exactly as an
    uninterrupted run would, even when best.json already names a later step. Before any restore
    the record starts from best.json (the chief's: `state_directory`) when its metric is ours.

    Every worker calls `update` with the same (globally reduced) values, so all make the same
    decision and run the same save. Ties keep the earlier step.
    """

    def __init__(self, directory: str, checkpoint: tf.train.Checkpoint, *,
                 metric: str = "valid/accuracy", state_directory: str | None = None):
        self.directory, self.checkpoint, self.metric = directory, checkpoint, metric
        self.metric_id = list(BEST_METRICS).index(metric)
        record = tf.Module()
        record.step = tf.Variable(-1, dtype=tf.int64, trainable=False)
        record.value = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        record.metric = tf.Variable(self.metric_id, dtype=tf.int64, trainable=False)
        record.evaluations_since = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.record = checkpoint.best = record
        self.state = self.read(state_directory or directory)
        if self.state is not None and self.state.get("metric", "valid/accuracy") == metric:
            record.step.assign(self.state["step"])
            record.value.assign(self.state.get("value", self.state.get("valid_accuracy")))

    read = staticmethod(read_best)

    @property
    def evaluations_since_best(self) -> int:
        return int(self.record.evaluations_since.numpy())

    def _better(self, value: float) -> bool:
        if int(self.record.step.numpy()) < 0:
            return True
        best = float(self.record.value.numpy())
        return value < best if BEST_METRICS[self.metric] == "min" else value > best

    def update(self, step: int, value: float, valid_accuracy: float | None = None,
               counts: bool = True) -> bool:
        """Save the model as the best one if `value` (of the metric) beats the best so far;
        True if saved. Otherwise one more evaluation without improvement, if it `counts`
        (False before --early_stopping_start)."""
        record = self.record
        if int(record.metric.numpy()) != self.metric_id:  # --best_metric changed on resume
            record.step.assign(-1)
            record.metric.assign(self.metric_id)
        if not self._better(value):
            if counts:
                record.evaluations_since.assign_add(1)
            return False
        record.step.assign(int(step))
        record.value.assign(float(value))
        record.evaluations_since.assign(0)
        os.makedirs(self.directory, exist_ok=True)
        name = f"ckpt-{int(step)}"
        fsync_checkpoint(self.checkpoint.write(os.path.join(self.directory, name)))
        saved = {"step": int(step), "metric": self.metric, "value": float(value),
                 "valid_accuracy": float(value if valid_accuracy is None else valid_accuracy),
                 "checkpoint": name}
        atomic_write_text(os.path.join(self.directory, BEST_STATE_FILE),
                          json.dumps(saved, indent=2))
        for entry in os.listdir(self.directory):
            if entry.startswith("ckpt-") and entry.split(".")[0] != name:
                os.remove(os.path.join(self.directory, entry))
        self.state = dict(saved, path=os.path.join(self.directory, name))
        return True

    def describe(self) -> str:
        if self.state is None:
            return "best checkpoint: none yet"
        metric = self.state.get("metric", "valid/accuracy")
        value = self.state.get("value", self.state.get("valid_accuracy"))
        return f"best checkpoint: step {self.state['step']} ({_SHORT[metric]} {value:.4f})"

    def summary(self) -> dict | None:
        """For results.json: step, metric, value, valid accuracy and checkpoint prefix of the
        best model."""
        if self.state is None:
            return None
        return {key: self.state.get(key) for key in
                ("step", "metric", "value", "valid_accuracy", "path")}
