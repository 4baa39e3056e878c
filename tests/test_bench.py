"""The speed benchmark runs end to end at a tiny size (no timing is asserted: it must not rot)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, bench_run_trainer
from trainer.loop.precision import resolve_precision


def test_bench_runs_every_row_and_prints_the_table(tmp_path, monkeypatch, capsys):
    """bench.run's main in this process: its rows still run in processes of their own (the
    trainer rows as the suite starts trainers, conftest.bench_run_trainer)."""
    from bench import run
    out = tmp_path / "bench.json"
    monkeypatch.setattr(run, "run_trainer", bench_run_trainer)
    assert run.main(["--model=small_resnet", "--image_size=32", "--batch_size=8",
                     "--replicas=2", "--steps=2", "--warmup_steps=1", "--images_per_class=4",
                     "--matmul_size=256", f"--json={out}"]) == 0
    stdout = capsys.readouterr().out
    measured = json.loads(out.read_text())
    assert set(measured["rows"]) == {"trainer", "trainer_auto", "reference_fit", "tuned_fit",
                                     "synthetic", "tf_keras", "tf_keras_auto", "input", "matmul"}
    for row in measured["rows"].values():
        assert all(value is None or value == value for value in row.values())  # no NaN
    assert measured["train_flops_per_image"] > 1e6
    rows = measured["rows"]
    assert rows["trainer"]["compute_dtype"] == "float32"
    assert rows["trainer_auto"]["compute_dtype"] == resolve_precision("auto").dtype
    assert rows["tf_keras"] == {"skipped": "the tf_keras anchor is ResNet50 only"}
    for label in ("a  trainer", "a2 trainer, auto precision", "b  reference fit",
                  "c  tuned fit", "d  trainer, synthetic", "e  input pipeline alone",
                  "f  matmul 256^3 float32", "g  tf_keras ResNet50, same step | skipped: ",
                  "MFU"):
        assert label in stdout, stdout


def test_bench_rejects_a_bad_row_in_one_line():
    result = subprocess.run([sys.executable, "-m", "bench.run", "--rows=trainer,warp"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown ['warp']" in result.stderr and "Traceback" not in result.stderr
