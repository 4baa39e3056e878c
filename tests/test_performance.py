"""trainer/report/performance.py: the matmul ceiling MFU is measured against, remembered per
device and dtype, and corrected when a run proves the remembered value too low (measured while
the machine was loaded)."""
from __future__ import annotations

import json

import pytest

from trainer.report import performance

pytestmark = pytest.mark.quick


def _key(dtype="float32"):
    return f"{performance._device_name()} {dtype}"


def test_a_run_faster_than_a_stale_ceiling_measures_it_again_and_keeps_the_higher(tmp_path):
    (tmp_path / "matmul_ceiling.json").write_text(json.dumps({_key(): 1e6}))  # 1 MFLOP/s
    ceiling = performance.machine_ceiling("float32", 0, str(tmp_path))
    assert ceiling == 1e6  # the remembered value, not measured again
    speed = performance.Speedometer(1e9, ceiling, "float32", 0, str(tmp_path))
    mfu = speed.mfu(1.0)  # 1 GFLOP/s of model work beats a 1 MFLOP/s "ceiling"
    assert speed.ceiling > 1e9 and mfu < 1.0  # real CPUs do more than 1 GFLOP/s
    assert json.loads((tmp_path / "matmul_ceiling.json").read_text())[_key()] == speed.ceiling
    measured = speed.ceiling
    speed.mfu(1e6)  # once per run: no second measurement
    assert speed.ceiling == measured


def test_measuring_again_never_lowers_the_remembered_ceiling(tmp_path):
    (tmp_path / "matmul_ceiling.json").write_text(json.dumps({_key(): 1e18}))
    assert performance.machine_ceiling("float32", 0, str(tmp_path), remeasure=True) == 1e18
    assert performance.machine_ceiling("float32", 2, str(tmp_path)) == 2e18  # x GPUs used
