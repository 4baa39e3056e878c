"""Checkpoints of model, optimizer and step; the run's saved class list and configuration.

Resume order (see train.py): read classes.json -> build model and optimizer -> restore the
latest checkpoint -> derive epoch and position in epoch from the restored step -> build the
input pipeline from that position.
"""
from __future__ import annotations

import json
import os
import tempfile

import tensorflow as tf


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class CheckpointKeeper:
    """tf.train.CheckpointManager over model_dir/checkpoints.

    The CheckpointManager writes the checkpoint files first and the `checkpoint` index last
    (atomically), so a kill during a save leaves the previous checkpoint the latest one.
    """

    def __init__(self, directory: str, *, model, optimizer, step: tf.Variable,
                 max_to_keep: int, every_steps: int):
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=max_to_keep, step_counter=step,
            checkpoint_interval=every_steps)

    def restore_latest(self, directory: str | None = None) -> str | None:
        """Restore the newest checkpoint of `directory` (default: our own). Non-chief workers
        write to a scratch directory but resume from the chief's."""
        path = tf.train.latest_checkpoint(directory) if directory else \
            self.manager.latest_checkpoint
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, force: bool = False) -> str | None:
        """Saves when `every_steps` have passed since the last save, or always with force."""
        return self.manager.save(check_interval=not force)

    def save_at_end(self, step: int) -> str:
        """The final checkpoint, unless the latest one already holds this step."""
        latest = self.manager.latest_checkpoint
        if latest and tf.train.load_variable(latest, "step/.ATTRIBUTES/VARIABLE_VALUE") == step:
            return latest
        return self.manager.save(check_interval=False)
