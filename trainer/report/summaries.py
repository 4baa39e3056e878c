"""TensorBoard writers and what goes into them: scalars, a sample-image grid, the config."""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf


class Summaries:
    """`train` and `eval` writers under model_dir (or no-op writers on non-chief workers)."""

    def __init__(self, model_dir: str | None):
        self.model_dir = model_dir
        if model_dir is None:
            self.train = self.eval = tf.summary.create_noop_writer()
        else:
            self.train = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
            self.eval = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))

    def scalars(self, writer, step: int, values: dict[str, float], prefix: str) -> None:
        with writer.as_default(step=step):
            for name, value in values.items():
                if isinstance(value, (int, float)):  # per-class values go elsewhere
                    tf.summary.scalar(f"{prefix}/{name}", value)

    def text(self, writer, step: int, name: str, markdown: str) -> None:
        with writer.as_default(step=step):
            tf.summary.text(name, markdown)

    def image(self, writer, step: int, name: str, png: bytes) -> None:
        with writer.as_default(step=step):
            tf.summary.image(name, tf.expand_dims(tf.io.decode_png(png, channels=4), 0))

    def flush(self) -> None:
        self.train.flush()
        self.eval.flush()


def markdown_table(rows: dict[str, object]) -> str:
    lines = ["| name | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in rows.items()]
    return "\n".join(lines)


# --- run description: secrets filtered, environment, hyperparameters --------------------------
SECRET_WORDS = ("secret", "key", "token", "password")


def public_fields(rows: dict[str, object]) -> dict[str, object]:
    """`rows` without the fields whose name looks like a credential (secret, key, token,
    password), for anything written where others can read it."""
    return {name: value for name, value in rows.items()
            if not any(word in name.lower() for word in SECRET_WORDS)}


def git_commit(directory: str | None = None) -> str:
    """`git rev-parse HEAD` of the code's repository ('+modified' when tracked files differ), or
    'unknown' (no git, not a checkout)."""
    import subprocess
    directory = directory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", directory, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+modified" if dirty else (commit or "unknown")


def environment(strategy, workers: int, precision_hardware: str) -> dict[str, object]:
    """Versions, devices and replicas of this process, for the `environment` text summary
    (`precision_hardware`: loop/precision.py's description of what the CPU or GPU offers)."""
    import platform
    import sys

    import keras
    rows = {"tensorflow": tf.__version__, "keras": keras.__version__,
            "python": sys.version.split()[0], "numpy": np.__version__,
            "host": platform.node(), "platform": platform.platform(),
            "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
            "workers": workers,
            "devices": ", ".join(d.name for d in tf.config.list_logical_devices()),
            "git_commit": git_commit(),
            "precision": keras.mixed_precision.global_policy().name,
            "precision_hardware": precision_hardware}
    for i, gpu in enumerate(tf.config.list_physical_devices("GPU")):
        rows[f"gpu{i}"] = tf.config.experimental.get_device_details(gpu).get("device_name", "?")
    return rows


# Config fields that describe bookkeeping, not the experiment: left out of the HParams dashboard.
NOT_HPARAMS = ("model_dir", "cache_images", "cache_memory_fraction", "steps_per_loop",
               "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "eval_figures",
               "sample_images", "high_loss_scan",
               "summary_histograms", "profile_steps", "on_bad_file",
               "export_at_end", "list_models")
# (group = run subdirectory, scalar tag) of the metrics shown beside the hyperparameters; the
# trainer writes every one of them (valid/* and test/* at the end, train/* each loop).
HPARAM_METRICS = (("eval", "valid/accuracy"), ("eval", "valid/loss"),
                  ("eval", "valid/top5_accuracy"), ("eval", "test/accuracy"),
                  ("eval", "test/loss"), ("eval", "test/top5_accuracy"),
                  ("train", "train/loss"), ("train", "train/accuracy"),
                  ("train", "train/images_per_second"))


def hparam_values(config: dict[str, object], plan: dict[str, object]) -> dict[str, object]:
    """What compares runs: the config minus bookkeeping and credentials, plus the derived
    replica count, global batch, peak learning rate and total steps."""
    values = {name: value for name, value in public_fields(config).items()
              if name not in NOT_HPARAMS}
    values.update(replicas=plan["num_replicas"], global_batch_size=plan["global_batch_size"],
                  peak_lr=plan["learning_rate"], total_steps=plan["total_steps"])
    return {name: ("" if value is None else value if isinstance(value, (bool, int, float, str))
                   else str(value)) for name, value in values.items()}


def write_hparams(model_dir: str, values: dict[str, object]) -> None:
    """The HParams session of this run, in model_dir itself (its train/ and eval/ runs hold the
    metrics), and the experiment declaration: every run writes the same one, so runs under one
    parent directory line up in one table."""
    from tensorboard.plugins.hparams import api as hp
    writer = tf.summary.create_file_writer(model_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name, hp.Discrete([False, True]) if isinstance(value, bool)
                               else None) for name, value in values.items()],
            metrics=[hp.Metric(tag, group=group, display_name=f"{tag} ({group})")
                     for group, tag in HPARAM_METRICS])
        hp.hparams(values, trial_id=os.path.basename(os.path.normpath(model_dir)))
    writer.close()


def write_histograms(writer, step: int, variables) -> None:
    """One histogram per trainable variable (`weights/<path>`)."""
    with writer.as_default(step=step):
        for variable in variables:
            tf.summary.histogram(f"weights/{variable.path}", variable)
