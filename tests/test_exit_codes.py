"""Exit codes that tell schedulers the truth, and signals in any phase (trainer/errors.py,
docs/reliability.md "Exit codes and signals"): a full, read-only or size-limited disk is 74 with
the previous checkpoint intact, a lost peer (and only that) is 69, a stop signal anywhere is 75,
a second signal ends the process at once. The disks are real: size-limited tmpfs mounts (the
tests run as root in the container; without mount permission they are skipped, saying so), a
read-only tmpfs, and RLIMIT_FSIZE for EFBIG."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import FAST_DEMO_FLAGS, REPO, start_trainer
from tests.file_events import wait_for_entry
from trainer import errors
from trainer.state import run_dir


@contextlib.contextmanager
def _tmpfs(path, size: str):
    """A real size-limited file system at `path` (tmpfs), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder, leave: int = 0) -> None:
    """Writes a filler file until the file system is full (the write fails with ENOSPC), then
    gives `leave` bytes back: room for the small appends of a loop (step_losses.tsv, events),
    not for a checkpoint."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:  # the last bytes of a block
                f.write(b"\0")
        if leave:
            f.truncate(max(0, f.tell() - leave))


def _full(error_call):
    with pytest.raises(BaseException) as caught:
        error_call()
    return caught.value


# ---- classification (in process, real errors) --------------------------------------------------
@pytest.mark.quick
def test_full_read_only_and_size_limited_disks_are_recognised_with_their_path(tmp_path):
    with _tmpfs(tmp_path / "disk", "256k") as disk:
        writer = tf.summary.create_file_writer(str(disk / "train"))
        _fill(disk)
        # an OSError from Python's own write
        error = _full(lambda: run_dir.write_json(str(disk / "results.json"), {"x": 1}))
        assert errors.disk_error(error) == ("No space left on device", str(disk / "results.json"))
        # TensorFlow's event file writer: ResourceExhaustedError naming the events file
        def write_events():
            with writer.as_default():
                for step in range(2000):
                    tf.summary.scalar("loss", 1.0, step=step)
            writer.flush()
        error = _full(write_events)
        assert isinstance(error, tf.errors.ResourceExhaustedError)
        reason, path = errors.disk_error(error)
        assert reason == "No space left on device"
        assert path.startswith(str(disk / "train" / "events.out.tfevents.")), path
        # a checkpoint save: the TF error, wrapped as the trainer wraps errors
        checkpoint = tf.train.Checkpoint(v=tf.Variable(np.zeros(100_000, np.float32)))
        error = _full(lambda: checkpoint.write(str(disk / "ckpt")))
        wrapped = errors.TrainingError(str(error))
        assert errors.disk_error(wrapped)[1].startswith(str(disk / "ckpt")), str(error)
    with _tmpfs(tmp_path / "read-only", "16k,ro") as disk:
        error = _full(lambda: open(disk / "new.txt", "w"))
        assert errors.disk_error(error) == ("Read-only file system", str(disk / "new.txt"))
    # a later error in a `finally` (runs.jsonl) keeps the first one's path
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/run/ckpt-3.index")
        finally:
            raise OSError(errno.ENOSPC, "No space left on device", "/run/runs.jsonl")
    except OSError as e:
        assert errors.disk_error(e) == ("No space left on device", "/run/ckpt-3.index")
    assert errors.disk_error(OSError(errno.ENOENT, "No such file", "/x")) is None
    assert errors.disk_error(errors.TrainingError("--data_dir: no train/ split")) is None


@pytest.mark.quick
def test_a_file_over_its_size_limit_is_recognised(tmp_path):
    """EFBIG from a real RLIMIT_FSIZE (set in a child: SIGXFSZ ignored, so the write fails)."""
    code = ("import resource, signal, sys\n"
            "from trainer import errors\n"
            "from trainer.state import run_dir\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10000, resource.getrlimit("
            "resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n"
            f"    run_dir.write_json({str(tmp_path / 'results.json')!r}, 'x' * 20000)\n"
            "except OSError as e:\n"
            "    print(errors.disk_error(e))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"('File too large', {str(tmp_path / 'results.json')!r})", out
    assert os.listdir(tmp_path) == []  # the temporary file is gone


@pytest.mark.quick
def test_results_json_on_a_full_disk_keeps_the_previous_file_whole(tmp_path):
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        results = disk / "results.json"
        run_dir.write_json(str(results), {"steps": 10})
        _fill(disk)
        with pytest.raises(OSError) as caught:
            run_dir.write_json(str(results), {"steps": 20, "pad": "x" * 100_000})
        assert caught.value.errno == errno.ENOSPC
        assert json.loads(results.read_text()) == {"steps": 10}
        assert sorted(os.listdir(disk)) == ["filler", "results.json"]  # no temporary left


@pytest.mark.quick
def test_only_errors_that_say_a_peer_is_gone_are_a_lost_peer(tmp_path):
    with pytest.raises(tf.errors.InvalidArgumentError) as bad_image:
        tf.io.decode_jpeg(b"\xff\xd8 not a jpeg")
    with pytest.raises(tf.errors.ResourceExhaustedError) as disk_full:
        with _tmpfs(tmp_path / "disk", "16k") as disk:
            _fill(disk)
            tf.train.Checkpoint(v=tf.Variable(np.zeros(10_000))).write(str(disk / "ckpt"))
    real = [bad_image.value, disk_full.value,
            tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"),
            tf.errors.NotFoundError(None, None, "/data/x.jpg; No such file or directory")]
    assert [errors.is_peer_lost(e) for e in real] == [False] * len(real)
    peer = [tf.errors.UnavailableError(None, None, "failed to connect to all addresses"),
            tf.errors.DeadlineExceededError(None, None, "Collective ops timed out"),
            tf.errors.CancelledError(None, None, "Cancelled after a peer's death"),
            tf.errors.AbortedError(None, None, "The coordination service has stopped"),
            tf.errors.UnknownError(None, None, "Socket closed"),
            tf.errors.InternalError(None, None, "Collective ops is aborted by: task "
                                    "/job:worker/replica:0/task:1 heartbeat timeout")]
    assert [errors.is_peer_lost(e) for e in peer] == [True] * len(peer)


@pytest.mark.quick
def test_a_first_signal_outside_the_loop_raises_and_a_second_exits_at_once():
    """In a child process: INTERRUPTS raises Interrupted outside a deferred block, records a
    signal inside one, and a second signal ends the process at once with 128 + signal."""
    code = ("import os, signal, sys, time\n"
            "from trainer.errors import INTERRUPTS, Interrupted\n"
            "INTERRUPTS.install()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "except Interrupted as e:\n"
            "    print('raised', e.signal, flush=True)\n"
            "INTERRUPTS.received.clear()\n"
            "with INTERRUPTS.deferred():\n"
            "    print('deferred', flush=True)\n"
            "    while not INTERRUPTS.received:\n"
            "        time.sleep(0.05)\n"
            "    print('recorded', INTERRUPTS.received, flush=True)\n"
            "    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == f"raised {int(signal.SIGINT)}\n"
    assert child.stdout.readline() == "deferred\n"
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline().startswith("signal 15 received: stopping at the end of this")
    assert child.stdout.readline() == f"recorded [{int(signal.SIGTERM)}]\n"
    start = time.time()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.time() - start < 2
    assert child.stderr.read().strip().splitlines()[-1].startswith("trainer: second signal 15")


CHILD_OF_A_SWEEP = """
import ctypes, signal, sys, time
from trainer.errors import INTERRUPTS
INTERRUPTS.install()
with INTERRUPTS.deferred(), open(sys.argv[1], "w", buffering=1) as out:
    out.write("ready\\n")
    while not INTERRUPTS.received:
        time.sleep(0.05)
    out.write("recorded\\n")
    time.sleep(3)
    out.write("alive\\n")
"""
A_SWEEP = """
import ctypes, os, signal, subprocess, sys, threading, time
libc = ctypes.CDLL(None)
threads = [threading.Thread(target=time.sleep, args=(600,), daemon=True) for _ in range(4)]
for thread in threads:
    thread.start()
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                         env=dict(os.environ, **{sys.argv[3]: "1"}),
                         preexec_fn=lambda: libc.prctl(1, signal.SIGTERM))
print(child.pid, flush=True)
time.sleep(600)
"""


def _wait_for_text(path, text: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.1)
    return False


def test_a_sweep_trial_takes_the_sweeps_death_notices_as_one_stop(tmp_path):
    """A trainer of trainer.sweep gets SIGTERM when the sweep dies (PR_SET_PDEATHSIG), once
    for each of the sweep's exiting threads. Seen in CI: a killed sweep's trainer exited 143
    on the second copy instead of saving its checkpoint (75). Here a parent with 4 threads
    starts the child as the sweep does (errors.SWEEP_TRIAL_ENV) and is SIGKILLed, then one
    more SIGTERM follows: the child still goes on to its own end."""
    out = tmp_path / "child.txt"
    parent = subprocess.Popen([sys.executable, "-c", A_SWEEP, CHILD_OF_A_SWEEP, str(out),
                               errors.SWEEP_TRIAL_ENV],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _wait_for_text(out, "ready", 30)
    parent.kill()
    parent.wait(timeout=10)
    assert _wait_for_text(out, "recorded", 10)
    os.kill(child_pid, signal.SIGTERM)
    assert _wait_for_text(out, "alive", 10), out.read_text()


# ---- trainer processes -------------------------------------------------------------------------
FLAGS = (*FAST_DEMO_FLAGS, "--distribution_strategy=one_device", "--noeval_figures",
         "--high_loss_scan=0", "--noexport_at_end")


def _start(*flags):
    return start_trainer(*flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(process, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line {prefix!r}; stderr:\n{process.stderr.read()[-3000:]}")


def _end(process, timeout=120) -> tuple[int, list[str], float]:
    """The exit code, the stderr lines and the seconds from this call to the exit."""
    start = time.time()
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err.strip().splitlines(), time.time() - start


def test_sigterm_during_the_data_check_exits_75_at_once(demo_dir, tmp_path):
    data = tmp_path / "data"  # a copy: the check cache of the session's demo would answer
    shutil.copytree(demo_dir, data, ignore=shutil.ignore_patterns(".check_cache.json"))
    model_dir = tmp_path / "run"
    process = _start(f"--data_dir={data}", f"--model_dir={model_dir}", *FLAGS)
    _wait_for_line(process, "data check: decoding ")
    process.send_signal(signal.SIGTERM)
    code, lines, elapsed = _end(process)
    assert code == errors.EXIT_PREEMPTED, lines[-20:]
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1] == (f"trainer: stopped by signal 15 outside the training loop (that phase "
                         f"abandoned); {model_dir} holds no checkpoint yet; run again with the "
                         f"same --model_dir to go on (exit code 75)")
    assert not (data / ".check_cache.json").exists()  # nothing half-done published
    print(f"exit 75 {elapsed:.1f} s after the SIGTERM")


def test_a_full_disk_in_a_checkpoint_save_exits_74_with_the_previous_checkpoint_intact(
        small_demo_dir, tmp_path):
    with _tmpfs(tmp_path / "disk", "64m") as disk:
        model_dir = disk / "run"
        process = _start(f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}", *FLAGS,
                         "--train_steps=200", "--checkpoint_every_steps=10")
        _wait_for_line(process, "epoch ")  # the first loop is done: its checkpoint comes next
        checkpoints = model_dir / "checkpoints"
        wait_for_entry(checkpoints, lambda name: name == "checkpoint", timeout=120)
        process.send_signal(signal.SIGSTOP)  # the disk fills while the trainer waits
        first = run_dir.latest_checkpoint(str(checkpoints))
        before = {n: (checkpoints / n).read_bytes() for n in os.listdir(checkpoints)
                  if os.path.basename(first) + "." in n}
        _fill(disk, leave=64 * 1024)
        process.send_signal(signal.SIGCONT)
        code, lines, elapsed = _end(process)
        assert code == errors.EXIT_DISK, lines[-20:]
        assert "Traceback" not in "\n".join(lines)
        assert lines[-1].startswith(f"trainer: the disk is full (No space left on device) "
                                    f"writing {checkpoints}/"), lines[-1]  # the latest or best
        assert lines[-1].endswith(f"stopped; the checkpoints up to {first} are intact; nothing "
                                  f"half-written is under a final name; make room (or make it "
                                  f"writable) and run again with the same --model_dir (exit "
                                  f"code 74)"), lines[-1]
        assert run_dir.latest_checkpoint(str(checkpoints)) == first
        assert {n: (checkpoints / n).read_bytes() for n in before} == before
        assert not (model_dir / "results.json").exists()
        step = tf.train.load_checkpoint(first).get_tensor(run_dir.STEP_KEY)
        assert step >= 5
    print(f"exit 74 {elapsed:.1f} s after the disk filled")


def test_a_full_disk_on_the_chief_of_two_workers_is_74_there_not_a_lost_peer(
        small_demo_dir, tmp_path):
    from tests.test_multiworker import TIMEOUT, WORKER_FLAGS, _start_workers, _wait_for_step
    with _tmpfs(tmp_path / "disk", "64m") as disk:
        model_dir = disk / "run"  # the chief's; worker 1 saves into its scratch folder
        flags = (f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}", *WORKER_FLAGS[:-2],
                 "--train_steps=2000", "--distribution_strategy=multi_worker_mirrored",
                 f"--collective_timeout={TIMEOUT}")
        workers = _start_workers(tmp_path, flags, "d")
        try:
            _wait_for_step(workers[0], 5)
            wait_for_entry(model_dir / "checkpoints", lambda name: name == "checkpoint")
            for worker in workers:
                worker.send_signal(signal.SIGSTOP)
            _fill(disk, leave=64 * 1024)
            for worker in workers:
                worker.send_signal(signal.SIGCONT)
            chief = _end(workers[0], timeout=TIMEOUT + 60)
            other = _end(workers[1], timeout=TIMEOUT + 60)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.communicate()
        assert chief[0] == errors.EXIT_DISK, chief[1][-20:]
        assert chief[1][-1].startswith(f"trainer: the disk is full (No space left on device) "
                                       f"writing {model_dir}/checkpoints/"), chief[1][-1]
        assert "Traceback" not in "\n".join(chief[1])
        # the other worker lost the chief, which is gone: that, and only that, is 69
        assert other[0] == errors.EXIT_PEER_LOST, other[1][-20:]
        assert other[1][-1].startswith("trainer: lost contact with worker:0"), other[1][-1]
    print(f"chief exit 74 {chief[2]:.1f} s after the disk filled")


def test_a_second_sigterm_in_the_loop_ends_the_trainer_at_once(small_demo_dir, tmp_path):
    """The first SIGTERM waits for the loop's end (40 steps here, several seconds); the second
    does not."""
    process = _start(f"--data_dir={small_demo_dir}", f"--model_dir={tmp_path / 'run'}",
                     *FLAGS[:-1], "--noexport_at_end", "--steps_per_loop=40",
                     "--eval_every_steps=1000", "--train_steps=1000")
    _wait_for_line(process, "epoch ")  # the first loop is done; the second has 40 steps
    process.send_signal(signal.SIGTERM)
    _wait_for_line(process, "signal 15 received: stopping at the end of this loop")
    process.send_signal(signal.SIGTERM)
    code, lines, elapsed = _end(process)
    assert code == 128 + signal.SIGTERM, lines[-20:]
    assert lines[-1] == ("trainer: second signal 15: stopping at once (exit code 143); the run "
                         "goes on from its last checkpoint")
    assert elapsed < 2, elapsed
    print(f"exit 143 {elapsed:.2f} s after the second SIGTERM")


def test_sigterm_during_the_s3_sync_exits_75_keeping_only_whole_files(s3_server, demo_dir,
                                                                      tmp_path):
    source = tmp_path / "source"
    for split in ("train", "valid", "test"):
        shutil.copytree(demo_dir / split, source / split)
    s3_server.make_bucket("exit-codes-sync", public=True)
    s3_server.upload_tree(str(source), "exit-codes-sync", "demo")
    cache = tmp_path / "cache"
    process = _start("--data_dir=s3://exit-codes-sync/demo", f"--data_cache_dir={cache}",
                     "--s3_anon", f"--s3_endpoint_url={s3_server.endpoint_url}",
                     f"--model_dir={tmp_path / 'run'}", *FLAGS)
    _wait_for_line(process, "syncing s3://exit-codes-sync/demo to ")
    local = cache / "exit-codes-sync" / "demo"
    # the downloads have begun: the first split folder appears (inotify, no polling)
    assert wait_for_entry(local, lambda name: name in ("train", "valid", "test"), timeout=60)
    process.send_signal(signal.SIGTERM)
    code, lines, elapsed = _end(process)
    assert code == errors.EXIT_PREEMPTED, lines[-20:]
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("trainer: stopped by signal 15 outside the training loop"), lines
    kept = [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for path in kept:  # a file under its final name is whole
        assert path.read_bytes() == (source / path.relative_to(local)).read_bytes(), path
    every = sum(1 for p in local.rglob("*") if p.is_file())
    print(f"exit 75 {elapsed:.1f} s after the SIGTERM, {len(kept)} whole files kept, {every} in all")
