"""Training through a real tf.data service (one dispatcher, one worker, on 127.0.0.1), and the
service's faults mid-run and at start (processes killed with SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer, start_trainer
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
             "--noexport_at_end", "--noeval_figures", "--high_loss_scan=0")
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


class Service:
    """A real dispatcher and worker (`python -m data.service`) on 127.0.0.1; more workers can be
    started, every process is stopped at the end."""

    def __init__(self):
        self.dispatcher_port, = free_ports(1)
        self.address = f"grpc://127.0.0.1:{self.dispatcher_port}"
        self.processes = []
        self.dispatcher = self._start("dispatcher", f"--port={self.dispatcher_port}")
        self.worker = self.start_worker()

    def start_worker(self) -> subprocess.Popen:
        port, = free_ports(1)
        return self._start("worker", f"--dispatcher=127.0.0.1:{self.dispatcher_port}",
                           f"--port={port}", "--worker_host=127.0.0.1")

    def _start(self, *role: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "data.service", *role], cwd=REPO,
                                   start_new_session=True, stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        # Its first line comes once the server runs (TensorFlow loaded).
        assert process.stdout.readline().startswith("data.service: "), role
        return process

    def stop(self) -> None:
        for process in self.processes:
            stop_process_group(process)


@pytest.fixture
def service():
    started = Service()
    yield started
    started.stop()


# A run of 4 loops of 10 steps on the 320-image cut (10 steps per epoch), no evaluation before the
# end and no export; the service's stall is noticed after TIMEOUT s without a batch.
TIMEOUT = 10  # long enough that a loaded machine (two test workers) still feeds each batch
RUN_FLAGS = (*FAST_DEMO_FLAGS, "--train_steps=40", "--steps_per_loop=10",
             "--eval_every_steps=40", "--checkpoint_every_steps=10", "--deterministic",
             "--distribution_strategy=one_device", "--noexport_at_end", "--noeval_figures",
             "--high_loss_scan=0", f"--data_service_timeout={TIMEOUT}")


def _start_trainer(*flags: str) -> subprocess.Popen:
    return start_trainer(*flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)


def _wait_for_steps(model_dir, steps: int, trainer: subprocess.Popen,
                    timeout: float = 240) -> None:
    """Until step_losses.tsv holds `steps` lines (the loops up to there are done)."""
    path = model_dir / "step_losses.tsv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        assert trainer.poll() is None, trainer.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps in {timeout} s")


def _wait_until_idle(process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process has used under 0.05 s of CPU in a second: blocked, not training or
    saving (a fixed sleep was too short on a busy machine, where the batches the client had
    prefetched lasted through the next loop and its save)."""
    def cpu_ticks() -> int:
        with open(f"/proc/{process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    hertz, deadline = os.sysconf("SC_CLK_TCK"), time.monotonic() + timeout
    before = cpu_ticks()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = cpu_ticks()
        if now - before < 0.05 * hertz:
            return
        before = now
    raise AssertionError(f"the trainer did not block within {timeout} s")


def _finish(trainer: subprocess.Popen, since: float, within: float) -> tuple[str, str, float]:
    """(stdout, stderr, seconds from `since` to the trainer's exit), which must come `within`
    seconds (else the trainer is killed and the test fails)."""
    try:
        stdout, stderr = trainer.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        stop_process_group(trainer)
        raise AssertionError(f"the trainer did not exit within {within} s") from None
    return stdout, stderr, time.monotonic() - since


def _stopped_line(stdout: str, run) -> str:
    """The run's last line, which must name the step that the checkpoint holds."""
    line = stdout.strip().splitlines()[-1]
    step = _last_run(run)["end_step"]
    assert _saved_step(run) == step
    assert line.endswith(f"saved at step {step}; run again with the same --model_dir to resume "
                         f"(exit code 75)"), line
    return line


def _saved_step(model_dir) -> int:
    import tensorflow as tf
    path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return int(tf.train.load_variable(path, "step/.ATTRIBUTES/VARIABLE_VALUE"))


def _last_run(model_dir) -> dict:
    return json.loads((model_dir / "runs.jsonl").read_text().splitlines()[-1])


def test_a_worker_killed_mid_run_stops_in_bounded_time_saving_the_completed_steps(
        service, small_demo_dir, tmp_path):
    run = tmp_path / "run"
    flags = (f"--data_dir={small_demo_dir}", f"--model_dir={run}", *RUN_FLAGS)
    trainer = _start_trainer(*flags, f"--data_service={service.address}")
    _wait_for_steps(run, 10, trainer)
    service.worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr, seconds = _finish(trainer, killed, within=TIMEOUT + 40)
    print(f"worker SIGKILL -> trainer exit: {seconds:.1f} s")
    assert trainer.returncode == 75, stdout + stderr
    line = _stopped_line(stdout, run)
    assert line.startswith(f"no training batch from the tf.data service {service.address} for "
                           f"{TIMEOUT} s (a worker or the dispatcher stopped"), line
    assert "Traceback" not in stderr
    # The steps the loop counted before it stalled (loop 2 or 3 cut short): the checkpoint's.
    step = _last_run(run)["end_step"]
    assert 10 < step < 40
    # A new worker: the run resumes from that step and completes.
    service.start_worker()
    resumed = run_trainer(*flags, f"--data_service={service.address}")
    assert f"at step {step} (" in resumed.stdout and "final test" in resumed.stdout
    assert _saved_step(run) == 40


def test_the_dispatcher_killed_mid_run_ends_the_run_in_bounded_time_either_way(
        service, small_demo_dir, tmp_path):
    """With dynamic sharding the worker asks the dispatcher for each new split of the data, so
    it serves a dead dispatcher's job only as far as the splits it already holds: on a fast
    machine that was the whole run (exit 0, measured on AVX-512 hosts), on a slower one the
    run stalled after step 30 of 40 (AVX2, 2026-12-04). Either way the run ends in bounded
    time: finished, or its completed steps saved with the one stop line (exit 75); the end
    never waits on the service client's retries of the dispatcher."""
    run = tmp_path / "run"
    trainer = _start_trainer(f"--data_dir={small_demo_dir}", f"--model_dir={run}", *RUN_FLAGS,
                             f"--data_service={service.address}")
    _wait_for_steps(run, 10, trainer)
    service.dispatcher.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr, seconds = _finish(trainer, killed, within=TIMEOUT + 60)
    code = trainer.returncode
    print(f"dispatcher SIGKILL -> exit {code}: {seconds:.1f} s")
    assert "Traceback" not in stderr
    if code == 0:
        assert _last_run(run)["end_step"] == 40 and _last_run(run)["exit"] == "finished"
        assert (run / "results.json").exists()
    else:
        assert code == 75, stdout + stderr
        assert _stopped_line(stdout, run).startswith(
            f"no training batch from the tf.data service {service.address} for {TIMEOUT} s")
        assert 10 <= _last_run(run)["end_step"] < 40


def test_sigterm_while_the_service_stalls_stops_at_once(service, small_demo_dir, tmp_path):
    """--data_service_timeout=600: the stop comes from the signal, not from the timeout."""
    run = tmp_path / "run"
    trainer = _start_trainer(f"--data_dir={small_demo_dir}", f"--model_dir={run}", *RUN_FLAGS,
                             f"--data_service={service.address}", "--data_service_timeout=600")
    _wait_for_steps(run, 10, trainer)
    service.worker.send_signal(signal.SIGKILL)
    _wait_until_idle(trainer)  # the prefetched batches used up, the loop blocked
    trainer.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr, seconds = _finish(trainer, signalled, within=40)
    print(f"SIGTERM -> trainer exit: {seconds:.1f} s")
    assert trainer.returncode == 75, stdout + stderr
    assert _stopped_line(stdout, run).startswith(
        f"stopped by signal {int(signal.SIGTERM)} while waiting "), stdout
    assert seconds < 20  # SIGNAL_GRACE (5 s) after the last step, then the save


def test_an_unreachable_dispatcher_at_start_stops_in_bounded_time(small_demo_dir, tmp_path):
    run = tmp_path / "run"
    port, = free_ports(1)  # nothing listens there
    started = time.monotonic()
    trainer = _start_trainer(f"--data_dir={small_demo_dir}", f"--model_dir={run}", *RUN_FLAGS,
                             f"--data_service=grpc://127.0.0.1:{port}")
    stdout, stderr, seconds = _finish(trainer, started, within=120)
    print(f"start -> exit with the dispatcher unreachable: {seconds:.1f} s")
    assert trainer.returncode == 75, stdout + stderr
    line = _stopped_line(stdout, run)
    assert line.startswith(f"the tf.data service dispatcher grpc://127.0.0.1:{port} did not "
                           f"answer for {TIMEOUT} s (Connection refused; "), line
    assert _last_run(run)["end_step"] == 0
