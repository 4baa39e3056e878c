"""TensorBoard as the place where runs are read and compared: two short real runs under one
parent directory, a real TensorBoard server over them (`python -m trainer.tensorboard`), its
HTTP data API (runs, scalar/image/text/histogram tags, HParams), and headless Chromium rendering
the dashboard (DOM text and a screenshot kept in test-artifacts/)."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import FAST_DEMO_FLAGS, REPO, start_trainer, trainer_command
from trainer.report import summaries
from trainer.tensorboard import free_port

ARTIFACTS = REPO / "test-artifacts"
# lr1 also has the optional extras: histograms + gradient norm, a profile, an in-loop evaluation.
RUNS = {"lr3": ("--base_lr=0.003",),
        "lr1": ("--base_lr=0.001", "--summary_histograms", "--profile_steps=2,3",
                "--eval_every_steps=5", "--sample_images")}


@pytest.fixture(scope="module")
def parent_dir(demo_dir, tmp_path_factory) -> Path:
    """Two finished 6-step runs side by side (trained in parallel)."""
    parent = tmp_path_factory.mktemp("runs")
    processes = {}
    for name, extra in RUNS.items():
        processes[name] = start_trainer(
            f"--data_dir={demo_dir}", f"--model_dir={parent / name}", *FAST_DEMO_FLAGS,
            "--train_steps=6", "--distribution_strategy=one_device", "--eval_figures", *extra,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: exit {process.returncode}\n{out}\n{err[-3000:]}"
    return parent


@pytest.fixture(scope="module")
def server(parent_dir, tmp_path_factory):
    """`python -m trainer.tensorboard PARENT --port=FREE` in its own process group; yields the
    base URL once both runs' data is loaded."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("tb") / "stderr.txt", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.tensorboard", str(parent_dir), f"--port={port}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else ""
        url = f"http://127.0.0.1:{port}/"
        log.seek(0)
        assert url in line, f"no URL printed: {line!r}\n{log.read()[-2000:]}"
        expected = {f"{name}/{sub}" for name in RUNS for sub in ("train", "eval")}
        deadline = time.time() + 90
        while not expected <= set(get_json(url, "data/runs")):  # the data server loads lazily
            assert time.time() < deadline, get_json(url, "data/runs")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def get_json(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        base + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def get_bytes(base: str, path: str) -> bytes:
    with urllib.request.urlopen(base + path, timeout=60) as response:
        return response.read()


def test_server_lists_both_runs_with_scalars_images_text_and_histograms(server):
    runs = set(get_json(server, "data/runs"))
    assert {"lr1", "lr1/train", "lr1/eval", "lr3", "lr3/train", "lr3/eval"} <= runs, runs

    scalars = get_json(server, "data/plugin/scalars/tags")
    images = get_json(server, "data/plugin/images/tags")
    text = get_json(server, "data/plugin/text/tags")
    for name in RUNS:
        assert {"train/loss", "train/accuracy", "train/learning_rate",
                "train/images_per_second"} <= set(scalars[f"{name}/train"])
        assert {"valid/loss", "valid/accuracy", "test/loss", "test/accuracy"} <= \
            set(scalars[f"{name}/eval"])
        assert {"valid/confusion_matrix", "valid/misclassified", "test/confusion_matrix"} <= \
            set(images[f"{name}/eval"])
        assert {"config", "environment"} <= set(text[f"{name}/train"])
    # The extras only where asked for.
    assert "train/gradient_norm" in scalars["lr1/train"]
    assert "train/gradient_norm" not in scalars["lr3/train"]
    assert {"train/sample_images", "train/sample_images_unaugmented"} <= \
        set(images["lr1/train"])
    assert not any(tag.startswith("train/sample_images") for tag in images.get("lr3/train", {}))
    histograms = get_json(server, "data/plugin/histograms/tags")
    assert any(tag.startswith("weights/") for tag in histograms.get("lr1/train", {}))
    assert "lr3/train" not in histograms

    # lr1 evaluated in the loop (step 5) and at the end (step 6): a confusion matrix each time.
    query = urllib.parse.urlencode({"run": "lr1/eval", "tag": "valid/confusion_matrix",
                                    "sample": 0})
    entries = get_json(server, f"data/plugin/images/images?{query}")
    assert [e["step"] for e in entries] == [5, 6]
    png = get_bytes(server, f"data/plugin/images/individualImage?{entries[-1]['query']}")
    assert png.startswith(b"\x89PNG")

    query = urllib.parse.urlencode({"run": "lr1/train", "tag": "environment"})
    environment = get_json(server, f"data/plugin/text/text?{query}")[0]["text"]  # as HTML
    import keras
    import tensorflow as tf
    assert f"<code>{tf.__version__}</code>" in environment
    assert f"<code>{keras.__version__}</code>" in environment
    assert re.search(r"git_commit</td>\s*<td><code>([0-9a-f]{40}(\+modified)?|unknown)</code>",
                     environment), environment
    assert "CPU:0" in environment


def test_hparams_compare_the_runs_with_their_final_metrics(server, parent_dir):
    experiment = get_json(server, "data/plugin/hparams/experiment", {"experimentName": ""})
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"model", "image_size", "batch_size", "global_batch_size", "optimizer", "base_lr",
            "peak_lr", "epochs", "train_steps", "total_steps", "mixed_precision", "replicas",
            "seed", "distribution_strategy"} <= names, names
    assert "model_dir" not in names and "steps_per_loop" not in names
    metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
    assert {("eval", "valid/accuracy"), ("eval", "valid/loss"), ("eval", "test/accuracy"),
            ("eval", "test/loss")} <= metrics
    # Every declared metric is a scalar tag the runs really write.
    scalars = get_json(server, "data/plugin/scalars/tags")
    for name in RUNS:
        for group, tag in metrics:
            assert tag in scalars[f"{name}/{group}"], (name, group, tag)

    groups = get_json(server, "data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"hparam": "base_lr", "order": "ORDER_ASC"}]})["sessionGroups"]
    assert [g["name"] for g in groups] == ["lr1", "lr3"]
    for group in groups:
        results = json.loads((parent_dir / group["name"] / "results.json").read_text())
        hparams = group["hparams"]
        assert hparams["base_lr"] == pytest.approx({"lr1": 0.001, "lr3": 0.003}[group["name"]])
        assert (hparams["model"], hparams["image_size"], hparams["replicas"]) == \
            ("small_resnet", 32, 1)
        assert hparams["total_steps"] == 6 and hparams["optimizer"] == "adam"
        values = {(m["name"]["group"], m["name"]["tag"]): m for m in group["metricValues"]}
        for split in ("valid", "test"):
            for metric in ("accuracy", "loss"):
                value = values[("eval", f"{split}/{metric}")]
                assert value["trainingStep"] == 6
                assert value["value"] == pytest.approx(results["splits"][split][metric],
                                                       rel=1e-6)


def test_profile_traces_only_where_asked(parent_dir):
    traces = list((parent_dir / "lr1" / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000, traces
    assert not (parent_dir / "lr3" / "train" / "plugins").exists()


def test_top_ops_of_the_trace_are_the_models_compute_with_self_times(parent_dir):
    """bench.top_ops on the same trace: the convolutions are among the costliest op types."""
    from bench import top_ops
    times, counts = top_ops.op_self_times(top_ops.newest_trace(str(parent_dir / "lr1")))
    ranked = sorted(times, key=lambda op: -times[op])
    assert any("Conv2D" in op for op in ranked[:5]), ranked[:10]
    assert all(ms >= 0 for ms in times.values())
    assert counts[ranked[0]] >= 2


def test_top_ops_self_time_subtracts_the_ops_nested_in_an_op():
    from bench import top_ops
    events = [(0, 100, "While"), (10, 30, "Conv2D"), (15, 5, "Cast"), (50, 20, "Mul"),
              (200, 7, "Mul")]
    assert sorted(top_ops._self_times(events)) == sorted(
        [("While", 50), ("Conv2D", 25), ("Cast", 5), ("Mul", 20), ("Mul", 7)])
    assert top_ops._op_type("model/conv1/Conv2D:_MklNativeConv2D") == "_MklNativeConv2D"
    assert top_ops._op_type("ExecutorState::Process") is None


@pytest.mark.parametrize("value", ["5,2", "3", "a,b", "0,4", "1,2,3"])
def test_bad_profile_steps_is_one_line_and_exit_2(value, tmp_path):
    result = subprocess.run(trainer_command(f"--data_dir={tmp_path}", f"--model_dir={tmp_path}",
                                            f"--profile_steps={value}"),
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--profile_steps" in lines[0], lines


def test_credentials_never_reach_summaries():
    rows = {"model": "resnet50", "s3_secret_access_key": "x", "s3_access_key_id": "y",
            "session_token": "z", "db_password": "w", "keep_checkpoints": 3}
    assert summaries.public_fields(rows) == {"model": "resnet50", "keep_checkpoints": 3}
    plan = {"num_replicas": 2, "global_batch_size": 64, "learning_rate": 0.1, "total_steps": 9}
    values = summaries.hparam_values(rows | {"model_dir": "/r", "cpu_devices": None}, plan)
    assert values == {"model": "resnet50", "cpu_devices": "", "replicas": 2,
                      "global_batch_size": 64, "peak_lr": 0.1, "total_steps": 9}


def test_launcher_refuses_a_missing_logdir_and_a_taken_port(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer.tensorboard", str(tmp_path / "nope")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "does not exist" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "trainer.tensorboard", str(tmp_path),
                                 f"--port={port}"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in result.stderr
    assert "http://" not in result.stdout


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI requires it")
    return path


def _headless(url: str, *args: str, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
             f"--virtual-time-budget={budget_ms}", *args, url],
            capture_output=True, text=True, timeout=180)


def test_chromium_renders_the_scalars_dashboard_with_both_runs(server, parent_dir):
    # The Time Series dashboard (TensorBoard's scalar charts, Angular) renders into the page
    # DOM; the legacy Polymer dashboards (#scalars, #hparams) render inside shadow roots, which
    # --dump-dom does not print. Deep links go in the query string: forceSVG draws the curves
    # as SVG paths (not WebGL in a worker); only cards in view are drawn, so a tag filter and a
    # tall window bring the valid curves into view.
    timeseries = "?" + urllib.parse.urlencode(
        {"forceSVG": "true", "tagFilter": "^(valid/(accuracy|loss)|train/loss)$"}) + "#timeseries"
    # Virtual time does not always wait for a chart's data: a few tries (about 4 s each).
    for _ in range(6):
        dom = _headless(server + timeseries, "--dump-dom", "--window-size=1400,1600")
        assert dom.returncode == 0, dom.stderr[-2000:]
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(
            r"<(script|style)\b.*?</\1>", " ", dom.stdout, flags=re.S)))
        # The valid/accuracy chart with its table of runs and values, and drawn curves (paths
        # of two points or more: train/loss has steps 5 and 6 in both runs).
        card = re.search(r"valid\s*/\s*accuracy(.*?)valid\s*/\s*loss", text)
        curves = re.findall(r'<path d="M[-0-9.,]+L[^"]*" style="[^"]*stroke: rgb', dom.stdout)
        if card and len(curves) >= 2:
            break
    for run in ("lr1/train", "lr1/eval", "lr3/train", "lr3/eval"):  # the run selector
        assert run in text, text[:3000]
    assert card, text[:3000]
    assert len(curves) >= 2, curves
    for name in RUNS:
        accuracy = json.loads((parent_dir / name / "results.json").read_text())[
            "splits"]["valid"]["accuracy"]
        assert re.search(rf"{name}/eval [-0-9.]+ {accuracy:.4f} 6 ", card.group(1)), card.group(1)

    ARTIFACTS.mkdir(exist_ok=True)
    from PIL import Image
    for name, fragment, tries in (("tensorboard-timeseries.png", timeseries, 3),
                                  ("tensorboard-hparams.png", "#hparams", 1)):
        path, best = ARTIFACTS / name, None
        for attempt in range(tries):  # the most complete picture (largest PNG) of a few
            candidate = ARTIFACTS / f".{attempt}-{name}"
            shot = _headless(server + fragment, f"--screenshot={candidate}",
                             "--window-size=1400,900")
            assert shot.returncode == 0 and candidate.exists(), shot.stderr[-2000:]
            if best is None or candidate.stat().st_size > best.stat().st_size:
                best = candidate.replace(ARTIFACTS / f".best-{name}")
            else:
                candidate.unlink()
        best.replace(path)
        with Image.open(path) as image:
            assert image.size == (1400, 900)
            # Not a blank page: a rendered dashboard has many colours.
            assert len(image.convert("RGB").getcolors(1 << 20)) > 50
