"""Sweeps on Optuna (trainer/sweep.py): real sweep processes, real trainers, real SQLite storage.

The trials are tiny (small_demo_dir, 32 px small_resnet, 12 steps, one replica) and
--deterministic, so that a trial stopped and resumed can be compared bit for bit with one
that ran through."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import FAST_DEMO_FLAGS, QUIET_FLAGS, REPO, run_trainer
from trainer import sweep

TRIAL_FLAGS = (*FAST_DEMO_FLAGS[:-1], "--steps_per_loop=2", "--train_steps=12",
               "--eval_every_steps=4", "--checkpoint_every_steps=4", "--deterministic",
               "--distribution_strategy=one_device", *QUIET_FLAGS)


@pytest.fixture
def base_flagfile(small_demo_dir, tmp_path) -> str:
    path = tmp_path / "base.cfg"
    path.write_text("\n".join((f"--data_dir={small_demo_dir}", *TRIAL_FLAGS)) + "\n")
    return str(path)


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.sweep", *args]


def start_sweep(*args: str) -> subprocess.Popen:
    return subprocess.Popen(sweep_command(*args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def load_trials(study_dir, name: str) -> list:
    storage = f"sqlite:///{study_dir}/study.db"
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def runs_of(model_dir) -> list[dict]:
    lines = (model_dir / "runs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def claimed_by(stdout: str) -> list[int]:
    """The trials a sweep process ran, from its `trial N: VALUES in DIR` lines."""
    return [int(m.group(1)) for m in re.finditer(r"^trial (\d+): \w+=", stdout, re.M)]


def test_sigterm_during_a_trial_resumes_it_and_the_study_completes(base_flagfile, tmp_path):
    """SIGTERM the sweep in trial 0 (after its first evaluation): the sweep exits 75 and the
    trial waits in the queue; the same command again resumes it from its checkpoint to the
    weights of an uninterrupted run with its values, then runs trial 1, which the median
    pruner stops. --sampler_seed=2 draws base_lr 0.003 for trial 0 and, after the restart
    (seed 2 + 1 trial sampled), 0.5 for trial 1, whose valid loss explodes."""
    study_dir = tmp_path / "study"
    args = (f"--flagfile={base_flagfile}", "--study=resume", f"--study_dir={study_dir}",
            "--trials=2", "--param=base_lr:categorical:0.003,0.5", "--metric=valid/loss",
            "--pruner=median", "--pruner_startup_trials=1", "--sampler_seed=2")
    first = start_sweep(*args)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("trial 0 step 4:"):
            first.send_signal(signal.SIGTERM)
            break
    out, err = first.communicate(timeout=300)
    output = "".join(seen) + out
    assert first.returncode == 75, output + err
    assert "trial 0: stopped after step" in output, output
    [waiting, fresh] = load_trials(study_dir, "resume")
    assert (waiting.state, waiting.params, fresh.state) == \
        (TrialState.WAITING, {"base_lr": 0.003}, TrialState.WAITING)
    [stop] = runs_of(study_dir / "trial-000")
    assert stop["exit"] == "preempted" and 4 <= stop["end_step"] < 12, stop

    second = subprocess.run(sweep_command(*args), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "trial 0: base_lr=0.003 in" in second.stdout and \
        "(resuming from its checkpoint)" in second.stdout, second.stdout
    trials = load_trials(study_dir, "resume")
    assert [(t.number, t.state, t.params["base_lr"]) for t in trials] == \
        [(0, TrialState.COMPLETE, 0.003), (1, TrialState.PRUNED, 0.5)]
    assert sorted(trials[0].intermediate_values) == [4, 8, 12]
    assert sorted(trials[1].intermediate_values) == [4]  # pruned at its first evaluation
    # Trial 0 ran twice, once to the stop and once from its checkpoint; trial 1 once, to its
    # pruning (SIGTERM: checkpoint saved, no results).
    stop, resume = runs_of(study_dir / "trial-000")
    assert resume["start_step"] == stop["end_step"] and resume["exit"] == "finished"
    [pruned] = runs_of(study_dir / "trial-001")
    assert pruned["exit"] == "preempted" and pruned["end_step"] < 12
    assert not (study_dir / "trial-001" / "results.json").exists()

    results = json.loads((study_dir / "trial-000" / "results.json").read_text())
    run_trainer(f"--flagfile={base_flagfile}", f"--model_dir={tmp_path / 'reference'}",
                "--base_lr=0.003")
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert results["weights_sha256"] == reference["weights_sha256"]
    assert trials[0].value == pytest.approx(results["splits"]["valid"]["loss"])

    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["best"]["number"] == 0 and summary["direction"] == "minimize"
    assert "--base_lr=0.003" in (study_dir / "best.cfg").read_text()
    assert "| 0 (best) | complete |" in (study_dir / "summary.md").read_text()
    assert "best trial: 0 (valid/loss" in second.stdout


def _hparams_session(model_dir) -> dict:
    """The HParams dashboard's session of a run: the hyperparameters its trainer wrote."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2
    for name in os.listdir(model_dir):
        if not name.startswith("events.out.tfevents"):
            continue
        for event in tf.compat.v1.train.summary_iterator(str(model_dir / name)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    start = data.session_start_info
                    return {"group": start.group_name, **{key: v.number_value for key, v in
                                                          start.hparams.items()}}
    raise AssertionError(f"no HParams session in {model_dir}")


def test_two_sweeps_share_one_study_without_duplicates(base_flagfile, tmp_path):
    """Two sweep processes started together on one new SQLite file: each trial runs once,
    in one of them; both end with the same finished study of 3 trials."""
    study_dir = tmp_path / "study"
    args = (f"--flagfile={base_flagfile}", "--study=shared", f"--study_dir={study_dir}",
            "--trials=3", "--param=base_lr:log_uniform:0.001:0.01", "--pruner=none",
            "--poll_seconds=1", "--train_steps=4")
    processes = [start_sweep(*args, f"--sampler_seed={seed}") for seed in (0, 100)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, out + err
        assert "study shared: 3 trials (3 complete)" in out, out
    mine, theirs = (claimed_by(out) for out, _ in outputs)
    assert mine and theirs and sorted(mine + theirs) == [0, 1, 2], (mine, theirs)
    trials = load_trials(study_dir, "shared")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:
        model_dir = study_dir / f"trial-{trial.number:03d}"
        assert [run["exit"] for run in runs_of(model_dir)] == ["finished"]  # ran once
        session = _hparams_session(model_dir)
        assert session["group"] == model_dir.name
        assert session["base_lr"] == pytest.approx(trial.params["base_lr"])


# Claims trials as fast as it can from a study of waiting trials, from the start time it reads
# on stdin once it has said it is ready.
CLAIMER = """
import sys, time
import optuna
from trainer import sweep
storage, _ = sweep.open_storage(sys.argv[1], 10, 120)
study = optuna.load_study(study_name="race", storage=storage)
print("ready", flush=True)
time.sleep(max(0.0, float(sys.stdin.readline()) - time.time()))
claimed = []
while (trial := sweep.claim_trial(study)) is not None:
    claimed.append(trial.number)
print(" ".join(map(str, claimed)))
"""


def test_concurrent_claims_on_sqlite_take_each_trial_once(tmp_path):
    """Four processes claim from 60 waiting trials at once: each trial goes to exactly one.
    (Optuna's own read-then-update on pysqlite lets two processes take the same trial.)"""
    url = f"sqlite:///{tmp_path}/study.db"
    storage, _ = sweep.open_storage(url, 10, 120)
    study = optuna.create_study(study_name="race", storage=storage)
    for _ in range(60):
        study.enqueue_trial({})
    processes = [subprocess.Popen([sys.executable, "-c", CLAIMER, url], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    for process in processes:  # every process has imported optuna and opened the storage
        assert process.stdout.readline() == "ready\n", process.communicate()
    begin = time.time() + 0.5  # one start time for all: they claim together
    for process in processes:
        process.stdin.write(f"{begin}\n")
        process.stdin.flush()
    claims = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        claims.append([int(n) for n in out.split()])
    assert sorted(sum(claims, [])) == list(range(60)), claims
    assert sum(1 for claimed in claims if claimed) >= 2, claims  # they did run together


def test_killed_sweep_trial_is_continued_from_its_checkpoint(base_flagfile, tmp_path):
    """SIGKILL the sweep during trial 0: its trainer gets SIGTERM (it must not train on
    alone), saves and exits 75. A new sweep finds trial 0 running without heartbeats, fails
    it and continues it as trial 1 in the same model_dir, from the checkpoint."""
    study_dir = tmp_path / "study"
    args = (f"--flagfile={base_flagfile}", "--study=killed", f"--study_dir={study_dir}",
            "--trials=1", "--param=base_lr:categorical:0.003", "--heartbeat_seconds=1",
            "--stale_after_seconds=3", "--poll_seconds=1")
    first = start_sweep(*args)
    for line in first.stdout:
        if line.startswith("trial 0 step 4:"):
            first.kill()
            break
    first.wait(timeout=60)
    deadline = time.time() + 120
    while runs_of(study_dir / "trial-000")[-1].get("exit") is None and time.time() < deadline:
        time.sleep(0.5)  # the orphaned trainer saving its checkpoint
    [orphan] = runs_of(study_dir / "trial-000")
    assert orphan["exit"] == "preempted" and orphan["end_step"] < 12, orphan

    second = subprocess.run(sweep_command(*args), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    lost, continued = load_trials(study_dir, "killed")
    assert (lost.state, continued.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert continued.user_attrs["continues"] == 0 and continued.params == lost.params
    assert continued.user_attrs["model_dir"] == "trial-000" and \
        not (study_dir / "trial-001").exists()
    assert 4 in continued.intermediate_values  # the lost trial's evaluation, carried over
    _, resume = runs_of(study_dir / "trial-000")
    assert resume["start_step"] == orphan["end_step"] and resume["exit"] == "finished"
    assert "fail (lost; continued as trial 1)" in second.stdout, second.stdout


@pytest.mark.parametrize("args, message", [
    (["--param=base_lrr:log_uniform:1e-4:1e-2"], "'base_lrr' is not a training flag"),
    (["--param=base_lr:log_uniform:0:1e-2"], "log_uniform needs low > 0"),
    (["--param=base_lr:uniform:0.1:0.01"], "needs low < high"),
    (["--param=base_lr:normal:0:1"], "needs type: one of"),
    (["--param=model_dir:categorical:a,b"], "--model_dir cannot be swept"),
    (["--param=crop_min_area:uniform:0.5:1.5"], "crop_min_area=1.5 (in the space) breaks"),
    (["--param=batch_size:uniform:16:32"], "batch_size=16.0 (in the space) breaks"),
    (["--param=train_steps:int:10:20:3"], "step must be >= 1 and divide high - low"),
    (["--param=base_lr"], "expected NAME:TYPE:ARGS"),
    ([], "give a search space"),
    (["--space=/nonexistent/space.yaml"], "cannot read it"),
    (["--param=base_lr:uniform:0.1:0.2", "--trials=0"], "flag error: flag --trials=0"),
    (["--param=base_lr:uniform:0.1:0.2", "--storage=sqlite:////nonexistent/x.db"],
     "no such folder /nonexistent"),
    (["--param=base_lr:uniform:0.1:0.2", "--storage=not a url"], "not a database URL"),
    (["--param=base_lr:uniform:0.1:0.2", "--image_size=4"], "the trial flags: flag"),
    (["--param=base_lr:uniform:0.1:0.2", "stray"], "unexpected argument 'stray'"),
])
def test_bad_input_is_one_line_naming_it(args, message, base_flagfile, tmp_path, capsys):
    argv = [f"--flagfile={base_flagfile}", "--study=bad", f"--study_dir={tmp_path / 's'}",
            "--trials=2", *args]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep: ") and message in err, err


def test_bad_flag_from_the_command_line_exits_2_without_traceback(base_flagfile, tmp_path):
    result = subprocess.run(sweep_command(f"--flagfile={base_flagfile}", "--study=x",
                                          "--trials=2", f"--study_dir={tmp_path}",
                                          "--param=lr:uniform:0:1"),
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("sweep: --param lr: 'lr' is not a training flag (python -m "
                             "trainer.main --helpfull lists them)\n")


def test_space_file_yaml_and_json(tmp_path):
    """YAML reads 1e-4 as text (it wants 1.0e-4); the space takes it as the number."""
    path = tmp_path / "space.yaml"
    path.write_text("base_lr: {type: log_uniform, low: 1e-4, high: 1e-2}\n"
                    "batch_size: {type: categorical, choices: [16, 32]}\n"
                    "train_steps: {type: int, low: 10, high: 40, step: 10}\n")
    assert sweep.read_space_file(str(path)) == [
        sweep.Param("base_lr", "log_uniform", 1e-4, 1e-2),
        sweep.Param("batch_size", "categorical", choices=(16, 32)),
        sweep.Param("train_steps", "int", 10, 40, 10)]
    path = tmp_path / "space.json"
    path.write_text('{"label_smoothing": {"type": "uniform", "low": 0, "high": 0.2}}')
    assert sweep.read_space_file(str(path)) == [
        sweep.Param("label_smoothing", "uniform", 0.0, 0.2)]
    path.write_text('{"label_smoothing": {"type": "uniform", "low": 0, "hi": 0.2}}')
    with pytest.raises(sweep.UsageError, match="uniform takes high, low, not hi"):
        sweep.read_space_file(str(path))


def test_another_space_on_the_same_study_is_refused(base_flagfile, tmp_path):
    argv = [f"--flagfile={base_flagfile}", "--study=one", f"--study_dir={tmp_path}",
            "--trials=2"]
    storage, _ = sweep.open_storage(f"sqlite:///{tmp_path}/study.db", 10, 120)
    first = sweep.parse_args([*argv, "--param=base_lr:uniform:0.001:0.01"])
    study = sweep.open_study(first, storage)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 2
    again = sweep.open_study(sweep.parse_args([*argv, "--trials=3",
                                               "--param=base_lr:uniform:0.001:0.01"]), storage)
    assert len(again.get_trials()) == 3  # a larger --trials adds one
    other = sweep.parse_args([*argv, "--param=base_lr:uniform:0.001:0.02"])
    with pytest.raises(sweep.UsageError, match="study one sweeps another space"):
        sweep.open_study(other, storage)
