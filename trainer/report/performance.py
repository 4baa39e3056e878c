"""Model FLOPs from TensorFlow's own cost analysis, and the measured matmul ceiling, for MFU.

MFU = training FLOPs per image x images/sec / ceiling. Training FLOPs per image are 3x the
forward pass (the backward pass costs about twice the forward: gradients with respect to
activations and to weights), with the forward FLOPs counted by TensorFlow's profiler on the
traced model graph (multiply-add = 2 FLOPs). The ceiling is a large matmul timed on this
machine in the compute dtype, not a datasheet number.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

import tensorflow as tf

BACKWARD_FACTOR = 3.0


def forward_flops_per_image(model, image_size: int) -> float:
    """FLOPs of one forward pass for one image, from tf.compat.v1.profiler on the graph."""
    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the v1 profiler announces its own deprecation
    try:
        profile = tf.compat.v1.profiler.profile(concrete.graph, options=options)
    finally:
        logger.setLevel(level)
    return float(profile.total_float_ops)


def matmul_flops_per_second(dtype: str = "float32", size: int = 4096, repeats: int = 3,
                            device: str | None = None) -> float:
    """The best of `repeats` timed size^3 matmuls (after a warm-up), in FLOP/s."""
    with tf.device(device or ("/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0")):
        a = tf.random.normal([size, size], dtype=tf.float32)
        a = tf.cast(a, dtype)
        b = tf.cast(tf.random.normal([size, size], dtype=tf.float32), dtype)
        matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[0, :1], tf.float32)))
        matmul(a, b).numpy()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).numpy()
            best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def _device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model} x{os.cpu_count()}"


def machine_ceiling(dtype: str, num_gpus_used: int, cache_dir: str | None = None,
                    remeasure: bool = False) -> float:
    """Peak FLOP/s of what the strategy uses: one GPU's matmul rate x GPUs, or the CPU's
    (logical CPU devices share the same cores, so they do not multiply it).

    Measured once per device and dtype (a few seconds) and remembered in
    `cache_dir`/matmul_ceiling.json (default ~/.cache/birdtrainer); delete it to measure again.
    With `remeasure` it is measured again and the cache keeps the higher of the two: a
    measurement taken while other jobs loaded the machine is too low, never too high.
    """
    cache_dir = cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "birdtrainer")
    cache_path = os.path.join(cache_dir, "matmul_ceiling.json")
    key = f"{_device_name()} {dtype}"
    try:
        with open(cache_path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known or remeasure:
        known[key] = max(known.get(key, 0.0), matmul_flops_per_second(dtype))
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(known, f, indent=1)
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    rate = known[key]
    return rate * num_gpus_used if num_gpus_used else rate


@dataclasses.dataclass
class Speedometer:
    """What MFU is measured against: training FLOPs per image and the machine's ceiling."""
    train_flops_per_image: float
    ceiling: float
    dtype: str = "float32"
    num_gpus: int = 0
    cache_dir: str | None = None
    remeasured: bool = False

    @classmethod
    def measure(cls, model, image_size: int, mixed_precision: str, strategy,
                cache_dir: str | None = None) -> "Speedometer":
        dtype = {"none": "float32"}.get(mixed_precision, mixed_precision)
        gpus = sum(1 for d in strategy.extended.worker_devices if "GPU" in d.upper())
        return cls(BACKWARD_FACTOR * forward_flops_per_image(model, image_size),
                   machine_ceiling(dtype, gpus, cache_dir), dtype, gpus, cache_dir)

    def mfu(self, images_per_second: float) -> float:
        """Model FLOP/s over the ceiling. A model beating the remembered ceiling proves that
        it was measured on a loaded machine: it is measured again, once per run, and the
        higher value kept (so MFU above 100% is not reported from a stale cache)."""
        flops = images_per_second * self.train_flops_per_image
        if flops > self.ceiling and not self.remeasured:
            self.remeasured = True
            self.ceiling = machine_ceiling(self.dtype, self.num_gpus, self.cache_dir,
                                           remeasure=True)
        return flops / self.ceiling
