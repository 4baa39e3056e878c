"""Faults beyond the process (docs/reliability.md): damaged checkpoints, a second writer, a
stale lock, model_dir rules, foreign files in data.pack/data.demo destinations, file modes and
fsync. Real TensorFlow, real files, real trainer processes (few: one whole run shared by the
checkpoint tests, each fault then one or two short starts)."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer, start_trainer
from trainer.loop.actions import StepLossLog
from trainer.state import checkpoints, recovery, run_dir, run_lock

# 30 steps, 10 per epoch on small_demo_dir; saves at steps 5, 15, 25 and 30 (ckpt-1..4; the
# newest three kept).
FLAGS = (*FAST_DEMO_FLAGS, "--train_steps=30", "--checkpoint_every_steps=10", "--deterministic",
         "--distribution_strategy=one_device", "--export_at_end")


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


def _last_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def _checkpoint_files(model_dir) -> dict[str, bytes]:
    folder = model_dir / "checkpoints"
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)
            if name.startswith("ckpt-")}


# ---- 1. damaged checkpoints -----------------------------------------------------------------
def test_newest_index_missing_is_set_aside_and_the_run_resumes_never_as_new(whole, tmp_path):
    run = whole.copy(tmp_path / "run")
    (run / "checkpoints" / "ckpt-4.index").unlink()
    config, results = (run / "config.json").read_bytes(), (run / "results.json").read_bytes()
    intact = {n: b for n, b in _checkpoint_files(run).items() if n.startswith(("ckpt-2", "ckpt-3"))}

    seed = run_trainer(*whole.flags(run), "--seed=7", "--noexport_at_end", check=False)
    assert seed.returncode == 1  # the run is recognised: its seed cannot change unasked
    assert _last_line(seed).startswith("trainer: --seed=7 but the run in ")
    aside = run / "checkpoints" / "unreadable-ckpt-4-index-missing"
    assert (f"checkpoint ckpt-4 does not restore: its index ckpt-4.index is missing; moved aside "
            f"to {aside} (kept, not deleted)") in seed.stdout
    assert os.listdir(aside) == ["ckpt-4.data-00000-of-00001"]
    assert (run / "config.json").read_bytes() == config
    assert (run / "results.json").read_bytes() == results
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-3")

    resumed = run_trainer(*whole.flags(run), "--noexport_at_end")
    assert f"resumed from {run / 'checkpoints' / 'ckpt-3'} at step 25" in resumed.stdout
    assert _sha(resumed.stdout) == whole.sha
    assert (run / "config.json").read_bytes() == config
    for name, data in intact.items():  # the new save (ckpt-4, step 30) replaced neither
        assert (run / "checkpoints" / name).read_bytes() == data, name
    assert os.listdir(aside) == ["ckpt-4.data-00000-of-00001"]


def test_truncated_newest_data_resumes_bit_identical_and_a_dead_holders_lock_is_taken_over(
        whole, tmp_path):
    run = whole.copy(tmp_path / "run")
    data = run / "checkpoints" / "ckpt-4.data-00000-of-00001"
    half = data.stat().st_size // 2
    os.truncate(data, half)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    holder = dict(run_lock.record(), pid=int(dead), pid_start="1", token="killed",
                  command=["python", "-m", "trainer.main", "(killed)"])
    (run / run_lock.LOCK_FILE).write_text(json.dumps(holder))

    result = run_trainer(*whole.flags(run), "--noexport_at_end")
    assert f"took over the stale lock of {run}: it was held by pid {dead} " in result.stdout
    assert f"and pid {dead} is no longer running on this host" in result.stdout
    aside = run / "checkpoints" / "unreadable-ckpt-4-data-unreadable"
    assert ("checkpoint ckpt-4 does not restore: its data do not read: truncated or corrupt "
            "(IndexError: Read less bytes than requested); moved aside to "
            f"{aside}") in result.stdout
    assert (aside / data.name).stat().st_size == half
    assert f"resumed from {run / 'checkpoints' / 'ckpt-3'} at step 25" in result.stdout
    # As the uninterrupted run: the same weights and the same losses of the steps trained again.
    assert _sha(result.stdout) == whole.sha
    whole_losses = StepLossLog.read(whole.dir / "step_losses.tsv")
    assert StepLossLog.read(run / "step_losses.tsv") == whole_losses
    assert not (run / run_lock.LOCK_FILE).exists()  # released at the end


def test_no_checkpoint_that_reads_is_one_line_and_exit_1_with_nothing_moved(whole, tmp_path):
    run = whole.copy(tmp_path / "run")
    for number in (2, 3, 4):
        data = run / "checkpoints" / f"ckpt-{number}.data-00000-of-00001"
        os.truncate(data, 1000)
    before = sorted(os.listdir(run / "checkpoints"))
    config = (run / "config.json").read_bytes()
    started = time.time()
    result = run_trainer(*whole.flags(run), check=False)
    assert result.returncode == 1
    line = _last_line(result)
    assert line.startswith(f"trainer: no checkpoint in {run / 'checkpoints'} reads: ckpt-4: its "
                           f"data do not read"), line
    assert "ckpt-3: " in line and "ckpt-2: " in line and "Nothing was moved or written" in line
    assert sorted(os.listdir(run / "checkpoints")) == before
    assert (run / "config.json").read_bytes() == config
    assert time.time() - started < 120


def _keeper(directory, keep=3):
    step = tf.Variable(0, dtype=tf.int64)
    weights = tf.Variable(tf.zeros([64, 64]))
    module = tf.Module()
    module.w = weights
    keeper = checkpoints.CheckpointKeeper(str(directory), model=module, optimizer=tf.Module(),
                                          step=step, max_to_keep=keep, every_steps=1)
    return keeper, step, weights


def _saved(directory, count=3):
    keeper, step, weights = _keeper(directory)
    for n in range(1, count + 1):
        step.assign(n * 10)
        weights.assign(tf.fill([64, 64], float(n)))
        keeper.save(force=True)
    return keeper


@pytest.mark.quick
def test_an_unreadable_state_file_is_set_aside_and_the_checkpoints_found_on_disk(tmp_path):
    folder = tmp_path / "checkpoints"
    _saved(folder)
    (folder / "checkpoint").write_text("model_checkpoint_path: {{{ not a state file\n")
    bits = bytearray((folder / "ckpt-3.data-00000-of-00001").read_bytes())
    bits[len(bits) // 2] ^= 0xFF  # a flipped bit: the CRC check catches it
    (folder / "ckpt-3.data-00000-of-00001").write_bytes(bits)
    lines = []
    assert recovery.resume_point(str(folder), log=lines.append) == str(folder / "ckpt-2")
    assert lines[0].startswith(f"checkpoints: {folder / 'checkpoint'} (CheckpointManager's "
                               f"state file) does not parse: moved aside to")
    assert "Checksum does not match" in lines[1] and "unreadable-ckpt-3-data-unreadable" in lines[1]
    assert (folder / "unreadable-checkpoint-state" / "checkpoint").exists()
    assert tf.train.latest_checkpoint(str(folder)) == str(folder / "ckpt-2")
    # The manager goes on from there and never touches what was moved aside.
    keeper, step, weights = _keeper(folder, keep=1)
    keeper.restore(str(folder / "ckpt-2"))
    assert float(weights[0, 0]) == 2.0
    for _ in range(3):
        step.assign_add(10)
        keeper.save(force=True)
    assert sorted(os.listdir(folder / "unreadable-ckpt-3-data-unreadable")) == [
        "ckpt-3.data-00000-of-00001", "ckpt-3.index"]


@pytest.mark.quick
def test_leftovers_of_a_first_save_that_never_completed_start_a_new_run(tmp_path):
    folder = tmp_path / "checkpoints"
    _saved(folder, count=1)
    (folder / "checkpoint").unlink()
    (folder / "ckpt-1.index").unlink()  # killed between the data file and the index
    lines = []
    assert recovery.resume_point(str(folder), log=lines.append) is None
    assert "no checkpoint was ever published" in lines[0]
    assert os.listdir(folder / "unreadable-ckpt-1-index-missing") == [
        "ckpt-1.data-00000-of-00001"]


@pytest.mark.quick
def test_an_unreadable_best_checkpoint_and_export_are_set_aside_never_deleted(tmp_path):
    model_dir = tmp_path / "run"
    best_dir = model_dir / "checkpoints" / "best"
    keeper, step, weights = _keeper(model_dir / "checkpoints")
    best = checkpoints.BestCheckpoint(str(best_dir), keeper.checkpoint)
    best.update(20, 0.5)
    data = best_dir / "ckpt-20.data-00000-of-00001"
    os.truncate(data, 10)
    lines = []
    recovery.check_best(str(model_dir), lines.append)
    aside = best_dir / "unreadable-ckpt-20-data-unreadable"
    assert lines == [f"best checkpoint ckpt-20 does not restore: its data do not read: truncated "
                     f"or corrupt (IndexError: Read less bytes than requested); moved aside with "
                     f"best.json to {aside} (kept, not deleted); the next evaluation that beats "
                     f"the run's best so far writes a new one"]
    assert sorted(os.listdir(aside)) == ["best.json", "ckpt-20.data-00000-of-00001",
                                         "ckpt-20.index"]
    best.update(30, 0.9)  # a new best: what was moved aside stays
    assert sorted(os.listdir(aside)) == ["best.json", "ckpt-20.data-00000-of-00001",
                                         "ckpt-20.index"]
    (best_dir / "best.json").write_text("{not json")
    recovery.check_best(str(model_dir), lines.append)
    assert "best.json does not parse" in lines[-1]
    assert (best_dir / "unreadable-best-state-unreadable" / "ckpt-30.index").exists()

    module = tf.Module()
    module.v = tf.Variable(tf.ones([256]))
    export = model_dir / "export" / "30"
    tf.saved_model.save(module, str(export))
    # The path results.json holds is where the run was when it finished (since moved).
    (model_dir / "results.json").write_text(json.dumps({"steps": 30,
                                                        "export_dir": "/elsewhere/export/30"}))
    os.truncate(export / "variables" / "variables.data-00000-of-00001", 5)
    recovery.check_exports(str(model_dir), lines.append)
    assert lines[-2].startswith(f"export {export} does not load: its variables: data do not "
                                f"read")
    assert lines[-1].startswith(f"{model_dir / 'results.json'} named that export: moved aside")
    assert os.listdir(model_dir / "export") == ["unreadable-30-data-unreadable"]
    assert not (model_dir / "results.json").exists()
    assert [n for n in os.listdir(model_dir) if n.startswith("results.export-unreadable-")]


@pytest.mark.quick
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


# ---- 2. one writer per run folder ------------------------------------------------------------
def test_two_trainers_started_two_seconds_apart_one_is_refused_naming_the_other(
        small_demo_dir, tmp_path):
    run = tmp_path / "run"
    flags = (f"--model_dir={run}", f"--data_dir={small_demo_dir}", *FAST_DEMO_FLAGS,
             "--train_steps=100000", "--distribution_strategy=one_device", "--noeval_figures",
             "--high_loss_scan=0")
    started = time.time()
    first = start_trainer(*flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = start_trainer(*flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while first.poll() is None and second.poll() is None and time.time() - started < 150:
            time.sleep(0.2)
        refused, other = (first, second) if first.poll() is not None else (second, first)
        assert refused.poll() == 1, "neither trainer was refused"
        assert other.poll() is None
        elapsed = time.time() - started
        lines = refused.stderr.read().strip().splitlines()
        assert lines[-1].startswith(f"trainer: --model_dir={run} is in use by pid {other.pid} on "
                                    f"host {platform.node()} since "), lines
        assert "Traceback" not in "\n".join(lines)
        holder, _ = run_lock.read(str(run / run_lock.LOCK_FILE))
        assert holder["pid"] == other.pid and "--train_steps=100000" in holder["command"]
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            process.stderr.close()
    print(f"refused after {elapsed:.1f} s")


@pytest.mark.quick
def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_or_expired_one(tmp_path):
    lines = []
    with run_lock.RunLock(str(tmp_path), lines.append) as held:
        with pytest.raises(run_lock.LockHeld, match=f"is in use by pid {os.getpid()} on host "):
            run_lock.RunLock(str(tmp_path)).acquire()
        with pytest.raises(run_lock.LockHeld):
            run_lock.check_free(str(tmp_path))
        before = os.stat(held.path).st_mtime
        time.sleep(0.05)
        held.beat()
        assert os.stat(held.path).st_mtime > before
        assert stat.S_IMODE(os.stat(held.path).st_mode) == 0o666 & ~_umask()
    assert not os.path.exists(os.path.join(tmp_path, run_lock.LOCK_FILE))
    path = tmp_path / run_lock.LOCK_FILE
    elsewhere = dict(run_lock.record(), host="another-host", pid=1, token="remote")
    path.write_text(json.dumps(elsewhere))  # heartbeat fresh: alive on its host
    with pytest.raises(run_lock.LockHeld, match="on host another-host"):
        run_lock.RunLock(str(tmp_path)).acquire()
    old = time.time() - run_lock.LEASE_SECONDS - 60
    os.utime(path, (old, old))  # its heartbeat stopped: taken over
    lock = run_lock.RunLock(str(tmp_path), lines.append)
    lock.acquire()
    assert lines[-1].startswith(f"took over the stale lock of {tmp_path}: it was held by pid 1 "
                                f"on host another-host")
    assert re.search(r"and its heartbeat stopped 3[56]\d s ago \(lease 300 s\)$", lines[-1])
    assert lock.record["took_over_from"]["token"] == "remote"
    lock.release()


LOSE_LOCK = """
import json, sys
from trainer.state import run_lock
lock = run_lock.RunLock(sys.argv[1]); lock.acquire()
with open(lock.path, "w") as f:
    json.dump(dict(run_lock.record(), pid=1, token="newer"), f)
lock.beat()
print("still running")
"""


@pytest.mark.quick
def test_a_holder_that_lost_its_lock_stops_at_once(tmp_path):
    result = subprocess.run([sys.executable, "-c", LOSE_LOCK, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "still running" not in result.stdout
    assert result.stderr.startswith(f"trainer: lost the lock of {tmp_path}: it is now held by "
                                    f"pid 1 on host")


# ---- 2. model_dir rules ----------------------------------------------------------------------
def test_a_synthetic_data_restart_of_a_real_run_is_refused_before_anything_is_written(
        whole, tmp_path):
    """Before, --synthetic_data on a real run rewrote classes.json (1000 synthetic classes) and
    plan.json before its restore failed, and every later real resume was refused."""
    run = whole.copy(tmp_path / "run")
    before = {name: (run / name).read_bytes()
              for name in ("classes.json", "plan.json", "config.json", "runs.jsonl")}
    result = run_trainer(f"--model_dir={run}", "--synthetic_data", *FLAGS, check=False)
    assert result.returncode == 1
    assert _last_line(result).startswith(
        "trainer: --synthetic_data=True but the run in ") and "used False" in _last_line(result)
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.quick
def test_a_runs_log_that_does_not_parse_is_one_line_naming_the_line(tmp_path):
    (tmp_path / run_dir.RUNS_FILE).write_text('{"time": "x"}\n{"broken\n')
    with pytest.raises(run_dir.RunError) as refused:
        run_dir.read_runs(str(tmp_path))
    assert str(refused.value).startswith(f"{tmp_path / run_dir.RUNS_FILE}: line 2 is not valid "
                                         f"JSON (") and "\n" not in str(refused.value)


def test_a_folder_that_is_not_a_run_is_refused_in_one_line_before_anything_is_written(
        small_demo_dir, tmp_path):
    other = tmp_path / "other_project"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's\n")
    result = run_trainer(f"--model_dir={other}", f"--data_dir={small_demo_dir}", *FLAGS,
                         check=False)
    assert result.returncode == 1
    assert result.stderr == (f"trainer: --model_dir={other}: a non-empty folder that is not a "
                             f"run of this trainer (no .trainer-run or config.json of a run; it "
                             f"holds notes.txt); nothing was written: give a new or empty "
                             f"folder, or the model_dir of a run\n")
    assert os.listdir(other) == ["notes.txt"]
    # What is a run: empty, marked, a config.json of ours (runs from before the marker), a lock,
    # a trial folder that trainer.sweep made for its log.
    for name, text in ((None, None), (run_dir.RUN_MARKER, "{}"), (run_lock.LOCK_FILE, "{}"),
                       ("sweep.log", "trial 0: ...\n"),
                       (run_dir.CONFIG_FILE, json.dumps({"model": "m", "image_size": 8,
                                                         "model_dir": "x"}))):
        folder = tmp_path / f"ok-{name}"
        folder.mkdir()
        if name:
            (folder / name).write_text(text)
        run_dir.check_run_folder(str(folder))
    (other / run_dir.CONFIG_FILE).write_text('{"name": "another tool"}')
    with pytest.raises(run_dir.RunError, match="not a run of this trainer"):
        run_dir.check_run_folder(str(other))


# ---- 2. data.pack and data.demo never delete what they did not write -----------------------
def test_demo_and_pack_never_delete_files_they_did_not_write(small_demo_dir, tmp_path, capsys):
    from data import demo, manifest, pack
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
        with pytest.raises(manifest.DataError, match="a non-empty folder that data.pack did not "
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
                 "data_report.json", "model.keras", run_dir.RUN_MARKER,
                 "checkpoints/best/best.json"):
        assert stat.S_IMODE(os.stat(whole.dir / name).st_mode) == 0o644, name
    export = whole.dir / "export" / "30"
    for folder, dirs, files in os.walk(export):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o644, name
    assert np.all([stat.S_IMODE(os.stat(whole.dir / "checkpoints" / n).st_mode) == 0o644
                   for n in os.listdir(whole.dir / "checkpoints") if n.startswith("ckpt-")])
