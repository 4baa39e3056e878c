"""Shared fixtures: real demo images on disk, and running the trainer as a real process.

In-process tests share one TensorFlow runtime, so the host CPU is split into two logical
devices here, before any test runs an op: both one-replica and two-replica strategies work.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the trainer runs (trainer/__init__.py)

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.s3_server"]


def pytest_configure(config):
    from trainer.loop import distribute
    distribute.split_cpu(2)


# The longest modules (seconds on 2 AVX2 cores, 2026-12-04: models 192, research 184,
# multiworker 181, service 170, sweep 141, resume 136, loop 132, bench 132, evaluate_export
# 114, packed 85), collected first: xdist's loadscope hands out modules in collection order,
# so a long one collected last ran alone at the end while the other worker idled.
LONGEST_MODULES = ("test_models", "test_research", "test_multiworker", "test_service",
                   "test_sweep", "test_resume", "test_loop", "test_bench",
                   "test_evaluate_export", "test_packed")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
    items.sort(key=rank)  # stable: a module's own tests keep their order


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """TMPDIR (and tempfile's directory) of this session and every process it starts: a folder
    under pytest's base temp, which pytest rotates. Processes the tests SIGKILL cannot remove
    their temporary files (TensorFlow's __autograph_generated_file*.py); they went to /tmp."""
    import tempfile
    scratch = str(tmp_path_factory.mktemp("tmpdir"))
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = scratch, scratch
    yield scratch
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the two logical CPUs for all in-process tests: strategies
    created side by side in one process share collective keys and can collide."""
    import tensorflow as tf
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded demo dataset (sklearn digits as 32x32 JPEGs), built once per session."""
    from data import demo
    dest = tmp_path_factory.mktemp("data") / "demo"
    demo.build(str(dest))
    return dest


@pytest.fixture(scope="session")
def small_demo_dir(demo_dir, tmp_path_factory) -> Path:
    """A cut of the demo dataset for runs that must cross epochs in few steps: the first 32
    train and 8 valid and test images of each class (320 train images: 10 steps per epoch at
    global batch 32; 80 valid and 80 test images, so the finishing evaluations are short)."""
    import shutil
    root = tmp_path_factory.mktemp("small_data") / "demo"
    for split, count in (("train", 32), ("valid", 8), ("test", 8)):
        for class_dir in sorted((demo_dir / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


# Outputs that cost a trainer process seconds and that most tests do not read: off in every test
# run, before the test's own flags (the last of a repeated flag wins, so a test that reads one
# turns it back on: --sample_images, --high_loss_scan=N, --eval_figures, --export_at_end).
QUIET_FLAGS = ("--nosample_images", "--high_loss_scan=0", "--noeval_figures",
               "--noexport_at_end")


def trainer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.main", *QUIET_FLAGS, *args]


# TEST_PRESTARTED=0: trainer processes start from scratch (tests/prestarted.py).
PRESTARTED = os.environ.get("TEST_PRESTARTED", "1") != "0"


def start_trainer(*args: str, nice: int = 0, **popen_options) -> subprocess.Popen:
    """`python -m trainer.main ARGS` from the repo root as a real process, forked from a server
    that has imported TensorFlow and the trainer (tests/prestarted.py): subprocess.Popen with
    `popen_options` (streams, env, start_new_session), `nice` added to its niceness."""
    from tests import prestarted
    popen_options.setdefault("cwd", REPO)
    if not PRESTARTED:
        return subprocess.Popen(trainer_command(*args), preexec_fn=lambda: os.nice(nice),
                                **popen_options)
    return prestarted.Popen(trainer_command(*args), server=prestarted.server(str(REPO)),
                            nice=nice, **popen_options)


@pytest.fixture(scope="session", autouse=True)
def _prestarted_server():
    yield
    from tests import prestarted
    prestarted.close()


def run_trainer(*args: str, timeout: float = 300, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python -m trainer.main ARGS` in a process of its own (start_trainer)."""
    process = start_trainer(*args, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr[-4000:]}")
    return result


def bench_run_trainer(model_dir: str, flags: list[str]) -> tuple[dict, str]:
    """bench.run_trainer (results.json and the console; TrainerFailed on a non-zero exit), the
    trainer started as the suite starts it: for tests that monkeypatch it into a benchmark."""
    import json

    from bench import TrainerFailed
    result = run_trainer(f"--model_dir={model_dir}", *flags, check=False)
    if result.returncode:
        raise TrainerFailed(f"the trainer exited {result.returncode}", result.stderr)
    return json.loads((Path(model_dir) / "results.json").read_text()), result.stdout


# Small, fast settings for the demo data used by many tests.
FAST_DEMO_FLAGS = ("--model=small_resnet", "--image_size=32", "--batch_size=32",
                   "--base_lr=0.003", "--warmup_epochs=0.5", "--crop_min_area=0.6",
                   "--norandom_flip", "--steps_per_loop=5")
