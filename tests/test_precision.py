"""trainer/loop/precision.py: what --mixed_precision=auto picks for each kind of hardware, and here."""
from __future__ import annotations

import pytest

from trainer.loop.precision import Hardware, detect_hardware, resolve_precision

pytestmark = pytest.mark.quick

NO_GPU = ()


@pytest.mark.parametrize("gpus, cpu_flags, dtype, policy", [
    (NO_GPU, {"avx512f", "avx512_bf16"}, "bfloat16", "mixed_bfloat16"),  # AMD Zen 4, Cooper Lake
    (NO_GPU, {"avx512f", "amx_bf16", "amx_tile"}, "bfloat16", "mixed_bfloat16"),  # Sapphire Rapids
    (NO_GPU, {"avx2", "avx512f"}, "float32", "float32"),  # Skylake: bfloat16 only emulated
    (NO_GPU, set(), "float32", "float32"),  # unknown CPU (no /proc/cpuinfo)
    (((8, 0), (8, 0)), set(), "bfloat16", "mixed_bfloat16"),  # A100s
    (((9, 0),), set(), "bfloat16", "mixed_bfloat16"),  # H100
    (((7, 0),), {"avx512_bf16"}, "float16", "mixed_float16"),  # V100: the GPU decides
    (((8, 6), (7, 5)), set(), "float16", "mixed_float16"),  # a T4 among newer GPUs
])
def test_auto_picks_the_fastest_native_dtype_and_says_why(gpus, cpu_flags, dtype, policy):
    chosen = resolve_precision("auto", Hardware(gpus, frozenset(cpu_flags)))
    assert (chosen.dtype, chosen.policy) == (dtype, policy)
    assert chosen.reason.startswith("auto: ")
    assert ("GPU" if gpus else "CPU") in chosen.reason
    assert chosen.describe().startswith(f"{dtype} (policy {policy}; auto: ")


@pytest.mark.parametrize("requested, dtype, flag_value", [
    ("none", "float32", "none"), ("bfloat16", "bfloat16", "bfloat16"),
    ("float16", "float16", "float16")])
def test_an_explicit_precision_is_kept_whatever_the_hardware(requested, dtype, flag_value):
    chosen = resolve_precision(requested, Hardware((), frozenset()))
    assert (chosen.dtype, chosen.flag_value) == (dtype, flag_value)
    assert chosen.reason == f"--mixed_precision={requested}"


def test_this_machine_is_read_from_proc_cpuinfo():
    hardware = detect_hardware()
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert hardware.cpu_flags == frozenset(flags)
    expected = "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"
    if not hardware.gpu_compute_capabilities:
        assert resolve_precision("auto").dtype == expected


def test_importing_the_trainer_turns_on_onednn_on_any_x86_cpu():
    """TensorFlow turns oneDNN on by itself only on AVX-512 CPUs; on an AVX2 CPU the trainer's
    default is what gives ConvNeXt its grouped-convolution gradients (trainer/__init__.py)."""
    import os
    import subprocess
    import sys
    from tests.conftest import REPO
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    probe = ("import trainer, tensorflow\n"
             "from tensorflow.python.util import _pywrap_util_port as port\n"
             "print(port.IsMklEnabled())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "True", out
