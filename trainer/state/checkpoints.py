"""Checkpoints of model, optimizer and the run's counters (the latest K, and the best one).

Resume order: trainer/loop/train.py's module doc.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from data.files import atomic_write_text
from trainer.state.run_dir import BEST_STATE_FILE, SavedRun, latest_checkpoint, read_best


class CheckpointKeeper:
    """tf.train.CheckpointManager over model_dir/checkpoints.

    The CheckpointManager writes the checkpoint files first and the `checkpoint` index last
    (atomically), so a kill during a save leaves the previous checkpoint the latest one.
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
        path = latest_checkpoint(directory) if directory else self.manager.latest_checkpoint
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, force: bool = False) -> str | None:
        """Saves when `every_steps` have passed since the last save, or always with force."""
        return self.manager.save(check_interval=not force)

    def save_at_end(self, step: int) -> str:
        """The final checkpoint, unless the latest one already holds this step."""
        latest = self.manager.latest_checkpoint
        if latest and SavedRun.checkpoint_step(latest) == step:
            return latest
        return self.manager.save(check_interval=False)


class BestCheckpoint:
    """The checkpoint with the highest validation accuracy so far, kept apart from the latest K
    (which CheckpointManager deletes as training goes on).

    `directory` (model_dir/checkpoints/best) holds `ckpt-<step>.index`, `ckpt-<step>.data-*` and
    `best.json` ({"step", "valid_accuracy", "checkpoint"}). A new best is written under its own
    prefix first; then best.json is replaced atomically to point at it; only then are the older
    files deleted. A kill at any moment leaves best.json naming a complete checkpoint.

    Every worker calls `update` with the same (globally reduced) accuracy, so all make the same
    decision and run the same save. Non-chief workers write to a scratch `directory` but start
    from the chief's record (`state_directory`), so a resumed run remembers the best so far.
    Ties keep the earlier step.
    """

    def __init__(self, directory: str, checkpoint: tf.train.Checkpoint, *,
                 state_directory: str | None = None):
        self.directory = directory
        self.checkpoint = checkpoint
        self.state = self.read(state_directory or directory)

    read = staticmethod(read_best)

    def update(self, step: int, accuracy: float) -> bool:
        """Save the model as the best one if `accuracy` beats the best so far; True if saved."""
        if self.state is not None and accuracy <= self.state["valid_accuracy"]:
            return False
        os.makedirs(self.directory, exist_ok=True)
        name = f"ckpt-{int(step)}"
        self.checkpoint.write(os.path.join(self.directory, name))
        record = {"step": int(step), "valid_accuracy": float(accuracy), "checkpoint": name}
        atomic_write_text(os.path.join(self.directory, BEST_STATE_FILE),
                          json.dumps(record, indent=2))
        for entry in os.listdir(self.directory):
            if entry.startswith("ckpt-") and entry.split(".")[0] != name:
                os.remove(os.path.join(self.directory, entry))
        self.state = dict(record, path=os.path.join(self.directory, name))
        return True

    def describe(self) -> str:
        if self.state is None:
            return "best checkpoint: none yet"
        return (f"best checkpoint: step {self.state['step']} "
                f"(valid acc {self.state['valid_accuracy']:.4f})")

    def summary(self) -> dict | None:
        """For results.json: step, valid accuracy and checkpoint prefix of the best model."""
        if self.state is None:
            return None
        return {"step": self.state["step"], "valid_accuracy": self.state["valid_accuracy"],
                "path": self.state["path"]}
