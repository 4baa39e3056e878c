"""The scale benchmark (bench/scale.py) end to end at a tiny size: the birds folder is built and
reused, quick rows land in the table, and a trainer killed for memory is a row, not a crash. No
timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

TINY = ["--scale=0.05", "--classes=4", "--image_size=32", "--model=small_resnet",
        "--batch_size=8", "--train_steps=4", "--steps_per_loop=2", "--input_steps=3",
        "--input_warmup=1"]


def _scale(tmp_path, *flags, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bench.scale", f"--data_dir={tmp_path / 'birds'}",
         f"--work_dir={tmp_path / 'work'}", *TINY, *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _cells(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_scale_bench_builds_the_set_and_reports_quick_rows(tmp_path):
    out = tmp_path / "scale.md"
    result = _scale(tmp_path, "--rows=check,folder_none,folder_auto", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table == result.stdout
    assert "4 classes, 32 / 4 / 4 train/valid/test JPEGs at 32 px" in table
    assert "(built in " in table
    marker = json.loads((tmp_path / "birds" / ".complete").read_text())
    assert marker["counts"] == {"train": 32, "valid": 4, "test": 4}
    assert len(list((tmp_path / "birds" / "train").iterdir())) == 4
    assert len(list((tmp_path / "birds" / "valid").glob("*/*.jpg"))) == 4

    check = _cells(table, "data check (`data.check`)")
    assert check[5] and check[6] and "40 files decoded" in check[7], check
    trainer = _cells(table, "folder, `--cache_images=none`")
    first_step, peak, input_rate, train_rate = trainer[1:5]
    assert all(float(v.replace(",", "")) > 0 for v in (first_step, peak, input_rate,
                                                        train_rate)), trainer
    auto = _cells(table, "folder, `--cache_images=auto`")
    # Until --cache_images=auto exists the trainer refuses it; then the row has numbers.
    assert auto[1] == "not available" and "auto" in auto[7] or float(auto[1]) > 0, auto
    assert not list((tmp_path / "work").iterdir())  # scratch removed

    again = _scale(tmp_path, "--build_only")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(reused)" in again.stdout


def test_scale_bench_row_survives_a_trainer_killed_for_memory(tmp_path):
    result = _scale(tmp_path, "--rows=folder_memory", "--max_rss_gb=0.3")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = _cells(result.stdout, "folder, `--cache_images=memory`")[7]
    assert "trainer killed by the bench (RSS" in notes and "--max_rss_gb=0.3" in notes, notes
    assert "peak RSS" in notes


def test_scale_bench_refuses_a_folder_it_did_not_build(tmp_path):
    (tmp_path / "birds" / "train").mkdir(parents=True)
    result = _scale(tmp_path, "--build_only")
    assert result.returncode == 1
    assert "is not a birds set built here" in result.stderr and "Traceback" not in result.stderr
