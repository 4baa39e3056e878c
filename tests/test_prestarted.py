"""The harness that starts trainer processes (tests/prestarted.py) reports what a fresh process
would: every trainer test reads its exit code and streams through it, so a harness that hid a
failure would hide it everywhere."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import REPO, run_trainer, start_trainer, trainer_command

pytestmark = pytest.mark.quick


def test_a_prestarted_trainer_exits_and_writes_as_a_fresh_process_does(tmp_path):
    flags = (f"--data_dir={tmp_path / 'missing'}", f"--model_dir={tmp_path / 'run'}")
    fresh = subprocess.run(trainer_command(*flags), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    forked = run_trainer(*flags, check=False)
    assert fresh.returncode == forked.returncode == 2
    assert (forked.stdout, forked.stderr) == (fresh.stdout, fresh.stderr)
    assert forked.stderr.count("\n") == 1 and "no such folder" in forked.stderr, forked.stderr


def test_a_prestarted_trainer_reads_the_environment_the_test_gives_it(tmp_path):
    """TF_CONFIG is read after TensorFlow has loaded: the child's, not the server's."""
    flags = ("--synthetic_data", "--model=small_resnet", "--image_size=32", "--batch_size=8",
             "--train_steps=2", f"--model_dir={tmp_path / 'run'}",
             "--distribution_strategy=multi_worker_mirrored")
    result = run_trainer(*flags, env={"TF_CONFIG": "{not json"}, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("trainer: TF_CONFIG is not valid JSON"), result.stderr


def test_a_prestarted_trainer_is_a_process_of_its_own(tmp_path):
    """Its own PID and session, the test's working directory, and a signal's exit status."""
    process = start_trainer("--synthetic_data", "--model=small_resnet", "--image_size=32",
                            "--batch_size=8", "--train_steps=100000", "--steps_per_loop=1",
                            f"--model_dir={tmp_path / 'run'}", cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert process.pid != os.getpid()
        assert os.getsid(process.pid) == process.pid  # start_new_session
        for line in process.stdout:
            if line.startswith("epoch "):
                break
        assert os.readlink(f"/proc/{process.pid}/cwd") == str(tmp_path)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
