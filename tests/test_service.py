"""Training through a real tf.data service (one dispatcher, one worker, on 127.0.0.1)."""
from __future__ import annotations

import json
import subprocess
import sys

import os

import pytest

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer
from tests.s3_server import free_ports, stop_process_group
from trainer.loop.actions import StepLossLog


@pytest.fixture
def data_service(tmp_path):
    """grpc://127.0.0.1:PORT of a dispatcher with one worker, both stopped at the end."""
    dispatcher_port, worker_port = free_ports(2)
    command = [sys.executable, "-m", "data.service"]
    processes = []
    for role in (["dispatcher", f"--port={dispatcher_port}"],
                 ["worker", f"--dispatcher=127.0.0.1:{dispatcher_port}", f"--port={worker_port}",
                  "--worker_host=127.0.0.1"]):
        processes.append(subprocess.Popen([*command, *role], cwd=REPO, start_new_session=True,
                                          stdout=subprocess.PIPE, text=True))
        # Its first line comes once the server runs (TensorFlow loaded).
        assert processes[-1].stdout.readline().startswith("data.service: "), role
    yield f"grpc://127.0.0.1:{dispatcher_port}", processes[1].pid
    for process in processes:
        stop_process_group(process)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_training_through_the_service_matches_a_local_run_and_evaluates_every_image_once(
        data_service, demo_dir, tmp_path):
    address, worker_pid = data_service
    flags = (f"--data_dir={demo_dir}", *FAST_DEMO_FLAGS, "--train_steps=8",
             "--steps_per_loop=4", "--deterministic", "--distribution_strategy=one_device",
             "--noexport_at_end", "--noeval_figures")
    idle = _cpu_seconds(worker_pid)
    served = run_trainer(f"--model_dir={tmp_path / 'served'}", *flags,
                         f"--data_service={address}")
    # The worker did the input work: decoding and augmenting 8 x 32 images, and the tracing.
    worked = _cpu_seconds(worker_pid) - idle
    print(f"worker CPU seconds during the run: {worked:.2f}")
    assert worked > 0.2  # 0.5 measured; about 0.02 for a worker left idle
    assert "final test" in served.stdout
    results = json.loads((tmp_path / "served" / "results.json").read_text())
    assert results["splits"]["valid"]["images"] == 269
    assert results["splits"]["test"]["images"] == 270
    # One worker: the local order and augmentation, so the very losses of a local run.
    idle = _cpu_seconds(worker_pid)
    run_trainer(f"--model_dir={tmp_path / 'local'}", *flags)
    print(f"worker CPU seconds during the local run: {_cpu_seconds(worker_pid) - idle:.2f}")
    assert StepLossLog.read(tmp_path / "served" / "step_losses.tsv") == StepLossLog.read(
        tmp_path / "local" / "step_losses.tsv")


def test_a_bad_service_address_is_a_flag_error(demo_dir, tmp_path):
    result = run_trainer(f"--data_dir={demo_dir}", f"--model_dir={tmp_path / 'run'}",
                         "--data_service=localhost:5050", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "trainer: flag error: flag --data_service=localhost:5050: --data_service must be "
        "grpc://HOST:PORT (or empty)")
