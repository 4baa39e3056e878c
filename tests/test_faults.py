"""Faults beyond the process: foreign files in data.pack/data.demo destinations, file modes and
fsync. Real TensorFlow, real files, real trainer processes (one whole run, shared)."""
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


# ---- 2. data.pack and data.demo never delete what they did not write -----------------------
def test_demo_and_pack_never_delete_files_they_did_not_write(small_demo_dir, tmp_path, capsys):
    from data import demo, pack, source
    saved = os.umask(0o022)
    try:
        dest = tmp_path / "demo"
        dest.mkdir()
        (dest / "mine.txt").write_text("keep me\n")
        assert demo.main([f"--dest={dest}"]) == 1
        assert capsys.readouterr().err == (
            f"data.demo: --dest={dest}: holds 1 file(s) this builder did not write (e.g. "
            f"mine.txt); no .complete marker; nothing was changed: choose another --dest or "
            f"move those files away\n")
        assert os.listdir(dest) == ["mine.txt"] and not list(tmp_path.glob(".demo-*"))
        built = tmp_path / "built"
        assert demo.main([f"--dest={built}"]) == 0
        assert stat.S_IMODE(os.stat(built).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(built / "train" / "one").st_mode) == 0o755
        assert demo.main([f"--dest={built}", "--seed=1"]) == 0  # its own files: replaced
        (built / "train" / "one" / "extra.jpg").write_bytes(b"x")
        assert demo.main([f"--dest={built}"]) == 1
        assert "holds 1 file(s) this builder did not write (e.g. train/one/extra.jpg)" in \
            capsys.readouterr().err
        assert (built / "train" / "one" / "extra.jpg").exists()

        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "theirs.tfrecord").write_bytes(b"x")
        with pytest.raises(source.DataError, match="a non-empty folder that data.pack did not "
                                                   "write"):
            pack.pack(str(small_demo_dir), str(foreign), shard_mb=0.04, log=lambda m: None)
        assert os.listdir(foreign) == ["theirs.tfrecord"]
        packed = tmp_path / "packed"
        pack.pack(str(small_demo_dir), str(packed), shard_mb=0.04, log=lambda m: None)
        first = set(os.listdir(packed))
        (packed / "theirs.tfrecord").write_bytes(b"x")
        lines = []
        pack.pack(str(small_demo_dir), str(packed), shard_mb=0.5, log=lines.append)
        names = set(os.listdir(packed))
        assert "theirs.tfrecord" in names  # not its own: left, with a line
        assert not {n for n in first if n.startswith("train-")} & names  # its own old shards
        assert any("left 1 .tfrecord file(s) that data.pack did not write" in line
                   for line in lines)
    finally:
        os.umask(saved)


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
