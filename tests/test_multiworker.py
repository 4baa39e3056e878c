"""Several workers (issue 15): real trainer processes with TF_CONFIG on 127.0.0.1. A stop signal
to one worker stops all at the same step and resumes bit-identically; a lost or frozen peer
ends the survivor with one line and exit code 69 within --collective_timeout."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer, start_trainer
from trainer.loop.actions import BatchIdsLog, StepLossLog

# No evaluation before the end, no high-loss scan, no figures, no export: these tests read the
# final results, the checkpoints and the batch logs only.
WORKER_FLAGS = (*FAST_DEMO_FLAGS[:-1], "--steps_per_loop=5", "--train_steps=30",
                "--checkpoint_every_steps=10", "--eval_every_steps=1000", "--high_loss_scan=0",
                "--deterministic", "--noeval_figures", "--noexport_at_end",
                "--debug_record_batches", "--distribution_strategy=multi_worker_mirrored")
TIMEOUT = 10  # --collective_timeout of the lost-peer tests (the survivor waits this long)
# The survivor's exit may come this much later than TIMEOUT (two test workers on two cores);
# still far below the default --collective_timeout of 300 s.
EXIT_MARGIN = 15


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(tmp_path, flags, name: str, count: int = 2) -> list[subprocess.Popen]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(count)]}
    workers = []
    for index in range(count):
        scratch = tmp_path / f"{name}-tmp{index}"
        scratch.mkdir()
        env = dict(os.environ, TMPDIR=str(scratch), TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(start_trainer(*flags, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    return workers


def _wait_for_step(worker: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in worker.stdout:
        lines.append(line)
        if line.startswith("epoch ") and int(line.split()[3].split("/")[0]) >= step:
            return lines
    raise AssertionError("".join(lines) + worker.stderr.read()[-3000:])


def _finish(workers) -> list[tuple[str, str]]:
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    return outputs


def _digest(stdout: str) -> str:
    return re.search(r"^final weights: sha256 (\w+)$", stdout, re.M).group(1)


def test_a_stop_on_one_worker_stops_all_and_resumes_bit_identical(small_demo_dir, tmp_path):
    # small_demo_dir: 10 steps per epoch, so the 30 steps and the resumes cross two epochs.
    demo_dir = small_demo_dir
    whole = tmp_path / "whole"
    outputs = _finish(_start_workers(tmp_path, (f"--data_dir={demo_dir}",
                                                f"--model_dir={whole}", *WORKER_FLAGS), "w"))
    # Both workers end with the very same weights (not only the same printed metrics).
    assert _digest(outputs[0][0]) == _digest(outputs[1][0])
    assert "2 replica(s)" in outputs[0][0]
    # Only the chief writes into model_dir; the other worker's scratch folder is gone.
    assert (whole / "results.json").exists() and list((tmp_path / "w-tmp1").iterdir()) == []

    parts = tmp_path / "parts"
    flags = (f"--data_dir={demo_dir}", f"--model_dir={parts}", *WORKER_FLAGS)
    workers = _start_workers(tmp_path, flags, "p")
    _wait_for_step(workers[0], 10)
    workers[1].send_signal(signal.SIGTERM)  # worker 1 only
    stopped = [w.communicate(timeout=60) for w in workers]
    assert [w.returncode for w in workers] == [75, 75], stopped[0][1][-2000:]
    at = [int(re.search(r"^stopped by .* at step (\d+):", out, re.M).group(1))
          for out, _ in stopped]
    assert at[0] == at[1] and 10 <= at[0] < 30
    assert "stopped by a stop signal to another worker" in stopped[0][0]
    latest = tf.train.latest_checkpoint(str(parts / "checkpoints"))
    assert int(tf.train.load_variable(latest, "step/.ATTRIBUTES/VARIABLE_VALUE")) == at[0]
    elastic = tmp_path / "elastic"  # the same stopped run, to resume on one worker below
    shutil.copytree(parts, elastic)

    resumed = _finish(_start_workers(tmp_path, flags, "r"))
    assert f"at step {at[0]}" in resumed[0][0]
    assert _digest(resumed[0][0]) == _digest(resumed[1][0]) == _digest(outputs[0][0])
    whole_results = json.loads((whole / "results.json").read_text())
    parts_results = json.loads((parts / "results.json").read_text())
    assert parts_results["splits"] == whole_results["splits"]

    whole_ids = BatchIdsLog.read(whole / "batch_ids.tsv")
    assert sorted(whole_ids) == list(range(1, 31))
    assert BatchIdsLog.read(parts / "batch_ids.tsv") == whole_ids

    # Stopped on two workers, resumed as one process with one replica (same global batch):
    # every step trains on the very images of the two-worker run.
    one = run_trainer(f"--data_dir={demo_dir}", f"--model_dir={elastic}", *WORKER_FLAGS[:-1],
                      "--distribution_strategy=one_device")
    assert f"at step {at[0]}" in one.stdout and "1 replica(s)" in one.stdout
    assert BatchIdsLog.read(elastic / "batch_ids.tsv") == whole_ids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_peer_ends_the_survivor_in_one_line(small_demo_dir, tmp_path, sig):
    flags = (f"--data_dir={small_demo_dir}", f"--model_dir={tmp_path / 'run'}", *WORKER_FLAGS[:-2],
             "--train_steps=2000", "--distribution_strategy=multi_worker_mirrored",
             f"--collective_timeout={TIMEOUT}")
    workers = _start_workers(tmp_path, flags, "l")
    try:
        _wait_for_step(workers[0], 5)  # the first loop (and its collectives) ran
        workers[1].send_signal(sig)
        start = time.time()
        _, err = workers[0].communicate(timeout=TIMEOUT + 60)
        elapsed = time.time() - start
    finally:
        for worker in workers:
            if sig == signal.SIGSTOP:
                worker.send_signal(signal.SIGCONT)
            worker.kill()
            worker.communicate()
    assert workers[0].returncode == 69, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("trainer: lost contact with worker:1 (127.0.0.1:"), last
    assert "restart every worker to resume (exit code 69" in last
    assert elapsed < TIMEOUT + EXIT_MARGIN, elapsed


@pytest.mark.quick
def test_a_lost_peer_is_named_when_the_error_names_no_task():
    """A frozen peer may surface as a collective's DeadlineExceeded naming no task (seen under
    load): with one other task the line still names it; with several it lists them."""
    from trainer.config import Config
    from trainer.loop.train import _peer_lost

    def line(workers: int, message: str) -> str:
        spec = tf.train.ClusterSpec({"worker": [f"127.0.0.1:{7000 + i}" for i in range(workers)]})
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            spec, task_type="worker", task_id=0)
        strategy = dataclasses.make_dataclass("Cluster", ["cluster_resolver"])(resolver)
        error = tf.errors.DeadlineExceededError(None, None, message)
        return str(_peer_lost(error, strategy, 10, Config(data_dir="d", model_dir="m")))

    assert line(2, "Graph execution error:").startswith(
        "lost contact with worker:1 (127.0.0.1:7001) after step 10 (DeadlineExceededError")
    assert line(3, "Graph execution error:").startswith(
        "lost contact with a peer (one of worker:1, worker:2) after step 10")
    assert line(3, "task /job:worker/replica:0/task:2 is gone").startswith(
        "lost contact with worker:2 (127.0.0.1:7002) after step 10")


def test_the_kubernetes_manifest_builds_a_consistent_cluster():
    import yaml
    service, job = yaml.safe_load_all((REPO / "configs" / "kubernetes-indexed-job.yaml").read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert spec["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    ignored = [rule["onExitCodes"]["values"] for rule in spec["podFailurePolicy"]["rules"]
               if rule["action"] == "Ignore"]
    assert [75, 69] in ignored  # stopped with a checkpoint / peer lost: recreate and resume
    script = pod["containers"][0]["args"][0]
    assert "--distribution_strategy=multi_worker_mirrored" in script
    port = service["spec"]["ports"][0]["port"]
    for index in range(spec["completions"]):
        exported = subprocess.run(
            ["sh", "-c", script.split("\n")[0] + '\nprintf %s "$TF_CONFIG"'],
            env={"JOB_COMPLETION_INDEX": str(index)}, capture_output=True, text=True,
            check=True).stdout
        config = json.loads(exported)
        assert config["task"] == {"type": "worker", "index": index}
        assert config["cluster"]["worker"] == [
            f"{job['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
            for i in range(spec["parallelism"])]


# ---- elastic: the global stream does not depend on who reads it ------------------------------
def _global_batches(files, labels, pipelines: int, replicas_per_pipeline: int, spec,
                    start_step: int, total_steps: int):
    """The global batches (image ids, images) the replicas of a run would train on, assembled
    in replica order from each input pipeline's per-replica batches."""
    from data import datasets
    streams = []
    for pipeline_id in range(pipelines):
        context = tf.distribute.InputContext(pipelines, pipeline_id,
                                             pipelines * replicas_per_pipeline)
        streams.append(list(datasets.train_dataset(
            files, labels, dataclasses.replace(spec, with_ids=True), context,
            start_step=start_step, total_steps=total_steps)))
    steps = len(streams[0]) // replicas_per_pipeline
    batches = []
    for step in range(steps):
        parts = [stream[step * replicas_per_pipeline + j] for stream in streams
                 for j in range(replicas_per_pipeline)]
        batches.append((np.concatenate([p[3].numpy() for p in parts]),
                        np.concatenate([p[0].numpy() for p in parts])))
    return batches


def test_the_global_batches_are_the_same_for_any_number_of_workers_and_replicas(demo_dir):
    from data import layout
    from data.spec import InputSpec
    split = layout.scan_split(str(demo_dir), "train", layout.train_class_names(str(demo_dir)))
    # 1258 images, global batch 32: 39 steps per epoch; steps 37-42 cross into epoch 2.
    spec, steps = InputSpec(image_size=32, global_batch_size=32, seed=3), (37, 42)
    one = _global_batches(split.files, split.labels, 1, 1, spec, *steps)
    assert len(one) == 5 and all(len(ids) == 32 for ids, _ in one)
    for pipelines, replicas, cache in ((1, 2, "memory"), (2, 1, "memory"), (2, 2, "none")):
        other = _global_batches(split.files, split.labels, pipelines, replicas,
                                dataclasses.replace(spec, cache=cache), *steps)
        assert len(other) == len(one)
        for (ids, images), (other_ids, other_images) in zip(one, other):
            np.testing.assert_array_equal(other_ids, ids)
            np.testing.assert_array_equal(other_images, images)  # augmentation too


def test_a_run_stopped_on_two_replicas_resumes_on_one_with_the_same_images(small_demo_dir,
                                                                           tmp_path):
    # small_demo_dir: 10 steps per epoch, so the resume and the 20 steps cross an epoch.
    flags = (f"--data_dir={small_demo_dir}", *WORKER_FLAGS[:-1], "--train_steps=20",
             "--checkpoint_every_steps=5")
    two = ("--distribution_strategy=mirrored", "--cpu_devices=2")
    whole = tmp_path / "whole"
    run_trainer(f"--model_dir={whole}", *flags, *two)
    parts = tmp_path / "parts"
    first = start_trainer(f"--model_dir={parts}", *flags, *two,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:
        if line.startswith("epoch ") and " step 5/20 " in line:
            first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    resumed = run_trainer(f"--model_dir={parts}", *flags, "--distribution_strategy=one_device")
    assert "1 replica(s)" in resumed.stdout and "resumed from" in resumed.stdout
    whole_ids = BatchIdsLog.read(whole / "batch_ids.tsv")
    assert sorted(whole_ids) == list(range(1, 21))
    assert BatchIdsLog.read(parts / "batch_ids.tsv") == whole_ids
    # The same images, but BatchNorm's batch statistics come from each replica's half batch
    # on two replicas and from the whole batch on one: after the resume the losses agree only
    # approximately (about 5% per step here), before it exactly.
    resumed_at = int(re.search(r"at step (\d+)", resumed.stdout).group(1))
    whole_losses = StepLossLog.read(whole / "step_losses.tsv")
    parts_losses = StepLossLog.read(parts / "step_losses.tsv")
    before = range(1, resumed_at + 1)
    assert [parts_losses[s] for s in before] == [whole_losses[s] for s in before]
    after = range(resumed_at + 1, 21)
    assert np.mean([parts_losses[s] for s in after]) == pytest.approx(
        np.mean([whole_losses[s] for s in after]), rel=0.1)


def test_a_scale_batch_resume_on_other_replicas_is_refused_or_counted_in_images(
        small_demo_dir, tmp_path):
    model_dir = tmp_path / "run"
    flags = (f"--data_dir={small_demo_dir}", f"--model_dir={model_dir}", *FAST_DEMO_FLAGS,
             "--batch_size=16", "--scale_batch", "--epochs=2", "--noeval_figures",
             "--noexport_at_end", "--high_loss_scan=0")
    first = start_trainer(*flags, "--distribution_strategy=mirrored", "--cpu_devices=2",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stopped_at = None
    for line in first.stdout:  # global batch 32: 10 steps per epoch, 20 steps in all
        if line.startswith("epoch ") and " step 5/20 " in line:
            first.send_signal(signal.SIGTERM)
        if line.startswith("stopped by signal"):
            stopped_at = int(line.split(" at step ")[1].split(":")[0])
    assert first.wait(timeout=120) == 75 and stopped_at in (5, 10)
    one = ("--distribution_strategy=one_device",)  # --scale_batch: global batch 16 now
    refused = run_trainer(*flags, *one, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "trainer: the global batch is 16 (1 replica(s)) but the run used 32: pass "
        "--allow_change=batch_size to continue from the number of images seen, or use the "
        "same global batch, or a new --model_dir")
    resumed = run_trainer(*flags, *one, "--allow_change=batch_size")
    assert (f"global batch changed from 32 to 16 (--allow_change): step {stopped_at} "
            f"({stopped_at * 32} images seen) continues as step {2 * stopped_at}; the epoch "
            f"position and the schedule are counted in images (the run ends at step 40)"
            ) in resumed.stdout
    assert f"at step {2 * stopped_at} " in resumed.stdout and "step 40/40" in resumed.stdout
    plan = json.loads((model_dir / "plan.json").read_text())
    assert plan["global_batch_size"] == 16 and plan["total_steps"] == 40
