"""--mixed_precision: the Keras policy, and what `auto` picks for this hardware.

`auto` is bfloat16 where the hardware computes it natively, float16 on GPUs that have fast
float16 but no bfloat16, float32 otherwise:
  - GPUs: every visible GPU of compute capability 8.0+ (A100, H100, RTX 30xx/40xx) -> bfloat16
    (no loss scaling needed); any older GPU (V100, T4) -> float16 with dynamic loss scaling.
  - CPUs without GPUs: AVX512_BF16 or AMX (`avx512_bf16`, `amx_bf16` in /proc/cpuinfo) ->
    bfloat16 (oneDNN runs bfloat16 convolutions and matmuls natively); otherwise float32, since
    emulated bfloat16 is slower than float32.
The hardware facts are arguments of `resolve_precision` so every branch can be checked on any
machine; `detect_hardware` reads them from this one.
"""
from __future__ import annotations

import dataclasses

POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
FLAG_VALUES = {"float32": "none", "bfloat16": "bfloat16", "float16": "float16"}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Hardware:
    gpu_compute_capabilities: tuple[tuple[int, int], ...]  # one per visible GPU; () on CPU
    cpu_flags: frozenset[str]  # /proc/cpuinfo "flags" of the first CPU

    def describe(self) -> str:
        if self.gpu_compute_capabilities:
            capabilities = ", ".join(f"{major}.{minor}"
                                     for major, minor in self.gpu_compute_capabilities)
            return f"GPU compute capability {capabilities}"
        found = [flag.upper() for flag in CPU_BF16_FLAGS if flag in self.cpu_flags]
        return f"CPU with {' and '.join(found)}" if found else "CPU without AVX512_BF16 or AMX"


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: str  # the compute dtype: float32, bfloat16 or float16
    reason: str  # why, for the console, plan.json and the environment text

    @property
    def policy(self) -> str:
        return POLICIES[self.dtype]

    @property
    def flag_value(self) -> str:
        return FLAG_VALUES[self.dtype]

    def describe(self) -> str:
        return f"{self.dtype} (policy {self.policy}; {self.reason})"


def detect_hardware() -> Hardware:
    import tensorflow as tf
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        capabilities.append(tuple(capability) if capability else (0, 0))
    return Hardware(tuple(capabilities), _cpu_flags())


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass  # not Linux: no flags known, so auto stays float32 on the CPU
    return frozenset()


def resolve_precision(requested: str, hardware: Hardware | None = None) -> Precision:
    """`requested` is a --mixed_precision value (none, bfloat16, float16, auto)."""
    if requested != "auto":
        dtype = {"none": "float32"}.get(requested, requested)
        return Precision(dtype, f"--mixed_precision={requested}")
    hardware = hardware or detect_hardware()
    found = hardware.describe()
    if hardware.gpu_compute_capabilities:
        if min(hardware.gpu_compute_capabilities) >= (8, 0):
            return Precision("bfloat16", f"auto: {found} runs bfloat16 natively")
        return Precision("float16", f"auto: {found} has float16 but no bfloat16 tensor cores")
    if any(flag in hardware.cpu_flags for flag in CPU_BF16_FLAGS):
        return Precision("bfloat16", f"auto: {found} runs bfloat16 natively")
    return Precision("float32", f"auto: {found} (bfloat16 would be emulated, slower)")


def apply_global_policy(config, log=print):
    """Resolves config.mixed_precision, sets Keras' global policy, prints the choice and returns
    the config with the concrete value (so that the loss scaling and MFU ceiling downstream see
    bfloat16/float16/none, never auto)."""
    import keras
    precision = resolve_precision(config.mixed_precision)
    keras.mixed_precision.set_global_policy(precision.policy)
    log(f"mixed precision: {precision.describe()}")
    return dataclasses.replace(config, mixed_precision=precision.flag_value)
