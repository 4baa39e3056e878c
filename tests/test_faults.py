"""Faults beyond the process: file modes and fsync. Real TensorFlow, real files, real trainer
processes (one whole run, shared)."""
from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import FAST_DEMO_FLAGS, run_trainer
from trainer.state import checkpoints

# 30 steps, 10 per epoch on small_demo_dir; saves at steps 5, 15, 25 and 30 (ckpt-1..4; the
# newest three kept).
FLAGS = (*FAST_DEMO_FLAGS, "--train_steps=30", "--checkpoint_every_steps=10", "--deterministic",
         "--distribution_strategy=one_device", "--noeval_figures", "--high_loss_scan=0")


class Whole:
    def __init__(self, model_dir, data_dir, stdout):
        self.dir, self.data_dir = model_dir, data_dir
        self.sha = _sha(stdout)

    def flags(self, model_dir) -> tuple[str, ...]:
        return (f"--model_dir={model_dir}", f"--data_dir={self.data_dir}", *FLAGS)

    def copy(self, dest):
        shutil.copytree(self.dir, dest, symlinks=True)
        return dest


def _sha(stdout: str) -> str:
    return [line.split()[-1] for line in stdout.splitlines()
            if line.startswith("final weights: sha256 ")][-1]


@pytest.fixture(scope="module")
def whole(small_demo_dir, tmp_path_factory) -> Whole:
    """One uninterrupted run (with its export), written under umask 022."""
    model_dir = tmp_path_factory.mktemp("faults") / "whole"
    saved = os.umask(0o022)
    try:
        result = run_trainer(f"--model_dir={model_dir}", f"--data_dir={small_demo_dir}", *FLAGS)
    finally:
        os.umask(saved)
    return Whole(model_dir, small_demo_dir, result.stdout)


def _keeper(directory, keep=3):
    step = tf.Variable(0, dtype=tf.int64)
    weights = tf.Variable(tf.zeros([64, 64]))
    module = tf.Module()
    module.w = weights
    keeper = checkpoints.CheckpointKeeper(str(directory), model=module, optimizer=tf.Module(),
                                          step=step, max_to_keep=keep, every_steps=1)
    return keeper, step, weights


def test_saves_fsync_the_files_and_folder_before_they_are_published(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    folder = tmp_path / "checkpoints"
    keeper, step, _ = _keeper(folder)

    def state_names_it(path):  # runs after fsync_checkpoint, before the manager's own callback
        synced.append(("published", tf.train.latest_checkpoint(str(folder))))
    path = keeper.manager.save(options=tf.train.CheckpointOptions(
        experimental_write_callbacks=[checkpoints.fsync_checkpoint, state_names_it]))
    assert {path + ".index", path + ".data-00000-of-00001", str(folder)} <= set(synced)
    assert synced[-1] == ("published", None)  # fsynced before the state file named it
    synced.clear()
    step.assign(10)
    keeper.save(force=True)
    assert str(folder / "ckpt-2.index") in synced
    synced.clear()
    from data.files import atomic_write_text
    atomic_write_text(str(tmp_path / "a.json"), "{}")
    assert synced[-1] == str(tmp_path) and len(synced) == 2  # the temp file, then the folder


# ---- 7. file modes -------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_run_files_and_exports_are_readable_as_the_umask_allows(whole):
    for name in ("config.json", "plan.json", "classes.json", "runs.jsonl", "results.json",
                 "data_report.json", "model.keras",
                 "checkpoints/best/best.json"):
        assert stat.S_IMODE(os.stat(whole.dir / name).st_mode) == 0o644, name
    export = whole.dir / "export" / "30"
    for folder, dirs, files in os.walk(export):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o644, name
    assert np.all([stat.S_IMODE(os.stat(whole.dir / "checkpoints" / n).st_mode) == 0o644
                   for n in os.listdir(whole.dir / "checkpoints") if n.startswith("ckpt-")])
