"""Build the tf.distribute strategy for a Config."""
from __future__ import annotations

import json
import os

import tensorflow as tf


class StrategyError(ValueError):
    """The requested distribution cannot run here; str() is a one-line message."""


def split_cpu(num_devices: int) -> None:
    """Expose the host CPU as `num_devices` logical devices. Must run before any op executes;
    calling it again with the same count is a no-op."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * num_devices
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as e:
        raise StrategyError(f"--cpu_devices={num_devices}: TensorFlow was already initialised "
                            f"with {len(tf.config.list_logical_devices('CPU'))} CPU devices") from e


def make_strategy(kind: str, cpu_devices: int = 0,
                  collective_timeout: float = 300.0) -> tf.distribute.Strategy:
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_devices > 1:
        split_cpu(cpu_devices)
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if kind == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        if cpu_devices > 1:
            return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_devices)])
        return tf.distribute.MirroredStrategy(["/cpu:0"])
    if kind == "multi_worker_mirrored":
        if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" not in os.environ:
            raise StrategyError("--distribution_strategy=multi_worker_mirrored needs TF_CONFIG "
                                "(or a SLURM job) describing the cluster")
        if "TF_CONFIG" in os.environ:
            try:
                json.loads(os.environ["TF_CONFIG"])
            except ValueError as e:
                raise StrategyError(f"TF_CONFIG is not valid JSON: {e}") from e
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        else:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        _bound_waits_on_peers(resolver, collective_timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=collective_timeout))
    raise StrategyError(f"unknown distribution strategy {kind!r}")


# A dead or frozen peer stops sending heartbeats; the coordination service then fails every
# worker's pending collective. TensorFlow's default heartbeat timeout is 10 s; ours is
# min(--collective_timeout, this), so a short test timeout is honoured too.
HEARTBEAT_TIMEOUT_SECONDS = 30.0


def _bound_waits_on_peers(resolver, collective_timeout: float) -> None:
    """Configure TensorFlow's coordination service as MultiWorkerMirroredStrategy would, but
    with bounded waits: a peer that stops sending heartbeats (killed, frozen, cut off) is
    declared lost after min(collective_timeout, 30) s, and the shutdown barrier at exit waits
    at most collective_timeout. Collectives that never complete (a peer alive but stuck) fail
    after collective_timeout through the strategy's CommunicationOptions."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context
    jobs = resolver.cluster_spec().as_dict()
    if context.context().coordination_service is not None or resolver.task_type not in (
            "chief", "worker"):
        return
    leader = "chief" if "chief" in jobs else "worker"
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        heartbeat_timeout_in_ms=int(1000 * min(collective_timeout, HEARTBEAT_TIMEOUT_SECONDS)),
        shutdown_barrier_timeout_in_ms=int(1000 * collective_timeout),
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(tasks))
                          for job, tasks in jobs.items() if job in ("chief", "worker")])


def num_workers(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, [])) for job in ("chief", "worker")) or 1


def input_pipeline_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's input pipeline (tf.distribute counts the chief first, then the workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return 0 if resolver.task_type == "chief" else resolver.task_id + int(has_chief)


def task_address(strategy: tf.distribute.Strategy, task: str) -> str:
    """`host:port` of a task named like "worker:1" (or the name itself if unknown)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    job, _, index = task.partition(":")
    try:
        return resolver.cluster_spec().as_dict()[job][int(index)]
    except (AttributeError, KeyError, IndexError, ValueError):
        return task


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes summaries, checkpoints and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def input_options(strategy: tf.distribute.Strategy) -> tf.distribute.InputOptions:
    """Without accelerators, batches already sit in host memory where the (logical CPU)
    replicas run: skip the per-device prefetch-and-copy stage, which only competes for cores."""
    on_accelerators = any("GPU" in d.upper() or "TPU" in d.upper()
                          for d in strategy.extended.worker_devices)
    return tf.distribute.InputOptions(experimental_fetch_to_device=on_accelerators)
