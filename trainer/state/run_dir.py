"""The run folder (--model_dir): its file names, and reading them back, for the trainer and
the tools alike. No TensorFlow at import, so that a wrong --model_dir is answered at once.

    config.json     the config of the run's first start (never rewritten)
    runs.jsonl      one line per start: time, command line, host, git commit, the config of that
                    start, start and end step, exit reason (the last line's config is the one a
                    resume is compared with)
    plan.json       the current plan (rewritten when an accepted change re-plans the run)
    classes.json    class names in label order
    checkpoints/    CheckpointManager's checkpoints; checkpoints/best/ the best one (best.json)
    results.json, model.keras, export/<step>/   the finished run's outputs
    .trainer-run    written first by a new run's first start: the folder is a run of this
                    trainer (check_run_folder refuses a non-empty folder that is not)
    .lock           the lock of the process writing the run (state/run_lock.py)

`SavedRun.load(model_dir)` reads config, classes and plan; `checkpoint_path` resolves
latest|best|PATH (state/checkpoints.py's `restore_model` builds the run's model from it).
"""
from __future__ import annotations

import dataclasses
import datetime
import getpass
import json
import os
import platform
import re
import sys

from data.files import atomic_write_text
from trainer.errors import RunError  # noqa: F401 (trainer.state.run_dir.RunError)

CONFIG_FILE = "config.json"
RUNS_FILE = "runs.jsonl"
PLAN_FILE = "plan.json"
CLASSES_FILE = "classes.json"
RESULTS_FILE = "results.json"
MODEL_FILE = "model.keras"
EXPORT_DIR = "export"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = os.path.join(CHECKPOINT_DIR, "best")
BEST_STATE_FILE = "best.json"

RUN_MARKER = ".trainer-run"
LOCK_PREFIX = ".lock"  # the lock and its temporary names (state/run_lock.py)
# Written into a new run folder by this project's launchers before the trainer starts:
# trainer.sweep (on main) sends each trial's output to STUDY_DIR/trial-NNN/sweep.log.
LAUNCHER_FILES = ("sweep.log",)

STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"


@dataclasses.dataclass(frozen=True)
class SavedRun:
    model_dir: str
    config: dict
    class_names: list[str]
    plan: dict

    @classmethod
    def load(cls, model_dir: str) -> "SavedRun":
        if not os.path.isdir(model_dir):
            raise RunError(f"--model_dir={model_dir}: no such directory")
        found = {}
        for name in ("config.json", "classes.json"):
            path = os.path.join(model_dir, name)
            if not os.path.exists(path):
                raise RunError(f"--model_dir={model_dir}: no {name} (not a training run "
                               f"directory)")
            found[name] = _read_json(path)
        plan_path = os.path.join(model_dir, "plan.json")
        plan = _read_json(plan_path) if os.path.exists(plan_path) else {}
        return cls(model_dir, found["config.json"], list(found["classes.json"]), plan)

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def eval_crop(self) -> float:
        """The run's --eval_crop (1.0, the squash, for runs from before the flag)."""
        return float(self.config.get("eval_crop") or 1.0)

    @property
    def model_name(self) -> str:
        return self.config["model"]

    @property
    def eval_batch_size(self) -> int:
        return int(self.plan.get("eval_global_batch_size") or self.config.get("batch_size") or 64)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.model_dir, "checkpoints")

    @property
    def best_dir(self) -> str:
        return os.path.join(self.checkpoint_dir, "best")

    def checkpoint_path(self, which: str) -> str:
        """The checkpoint prefix for --checkpoint=latest|best|PATH (PATH: a prefix, or a
        directory holding a CheckpointManager index or a best.json). No TensorFlow needed."""
        if which == "latest":
            path = latest_checkpoint(self.checkpoint_dir)
            if not path:
                raise RunError(f"--checkpoint=latest: no checkpoint in {self.checkpoint_dir}")
            return path
        if which == "best":
            state = read_best(self.best_dir)
            if state is None:
                raise RunError(f"--checkpoint=best: no {BEST_STATE_FILE} in "
                               f"{self.best_dir} (the run has not evaluated on valid yet)")
            return state["path"]
        if os.path.isdir(which):
            state = read_best(which)
            path = state["path"] if state else latest_checkpoint(which)
            if not path:
                raise RunError(f"--checkpoint={which}: the directory holds no checkpoint")
            return path
        if not os.path.exists(which + ".index"):
            raise RunError(f"--checkpoint={which}: not latest, best, a checkpoint directory or "
                           f"a checkpoint prefix ({which}.index does not exist)")
        return which

    @staticmethod
    def checkpoint_step(path: str) -> int | None:
        import tensorflow as tf
        try:
            return int(tf.train.load_variable(path, STEP_KEY))
        except (tf.errors.NotFoundError, ValueError):
            return None


def latest_checkpoint(directory: str) -> str | None:
    """As tf.train.latest_checkpoint, read from CheckpointManager's text index `checkpoint`."""
    index = os.path.join(directory, "checkpoint")
    if not os.path.exists(index):
        return None
    with open(index) as f:
        match = re.search(r'^model_checkpoint_path: "(.*)"$', f.read(), re.MULTILINE)
    if not match:
        return None
    path = os.path.join(directory, match.group(1))  # join keeps an absolute path as it is
    return path if os.path.exists(path + ".index") else None


def read_best(directory: str) -> dict | None:
    """best.json of a BestCheckpoint directory with "path" (the checkpoint prefix), or None."""
    path = os.path.join(directory, BEST_STATE_FILE)
    if not os.path.exists(path):
        return None
    state = _read_json(path)
    return dict(state, path=os.path.join(directory, state["checkpoint"]))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


read_json = _read_json


def write_json(path: str, value) -> None:
    """Atomically: a reader sees the old file or the new one, never a part."""
    atomic_write_text(path, json.dumps(value, indent=2))


def current_config(model_dir: str) -> dict | None:
    """The config the run last started with (runs.jsonl), else its first one (config.json),
    else None (a new run)."""
    runs = read_runs(model_dir)
    if runs and "config" in runs[-1]:
        return runs[-1]["config"]
    path = os.path.join(model_dir, CONFIG_FILE)
    return _read_json(path) if os.path.exists(path) else None


def read_runs(model_dir: str) -> list[dict]:
    path = os.path.join(model_dir, RUNS_FILE)
    if not os.path.exists(path):
        return []
    runs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                runs.append(json.loads(line))
            except ValueError as e:
                raise RunError(f"{path}: line {number} is not valid JSON ({e}); restore the file, "
                               f"or move it away to compare this start with config.json") from None
    return runs


class RunsLog:
    """runs.jsonl: `start` appends this start's line; `end` fills in its end step and exit
    reason (the file is rewritten atomically). A killed process leaves end_step null."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, RUNS_FILE)
        self.model_dir = model_dir

    def start(self, config: dict, start_step: int, git_commit: str) -> None:
        entry = {"time": _now(), "command": [os.path.basename(sys.executable)] + sys.argv,
                 "host": platform.node(), "user": getpass.getuser(), "git_commit": git_commit,
                 "start_step": start_step, "end_step": None, "exit": None, "config": config}
        self._write(read_runs(self.model_dir) + [entry])

    def end(self, end_step: int, reason: str) -> None:
        runs = read_runs(self.model_dir)
        if runs:
            runs[-1].update(end_step=end_step, exit=reason, end_time=_now())
            self._write(runs)

    def _write(self, runs: list[dict]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in runs))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_our_config(path: str) -> bool:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "image_size", "model_dir"} <= set(config)


def check_run_folder(model_dir: str) -> None:
    """Raise RunError (one line) unless `model_dir` is missing, empty, or a run of this trainer
    (its marker, or a config.json of ours from a run started before the marker). A folder that
    holds only a lock is a run whose first start died before writing anything else; one that
    holds only a launcher's log (LAUNCHER_FILES) is about to become a run."""
    if not os.path.exists(model_dir):
        return
    if not os.path.isdir(model_dir):
        raise RunError(f"--model_dir={model_dir}: exists and is not a folder")
    entries = sorted(os.listdir(model_dir))
    if not entries or os.path.exists(os.path.join(model_dir, RUN_MARKER)) or \
            _is_our_config(os.path.join(model_dir, CONFIG_FILE)) or \
            all(e.startswith(LOCK_PREFIX) or e in LAUNCHER_FILES for e in entries):
        return
    more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
    raise RunError(f"--model_dir={model_dir}: a non-empty folder that is not a run of this "
                   f"trainer (no {RUN_MARKER} or {CONFIG_FILE} of a run; it holds "
                   f"{entries[0]}{more}); nothing was written: give a new or empty folder, or "
                   f"the model_dir of a run")


def mark_run(model_dir: str, command: list[str]) -> None:
    """Write the run marker if it is missing (the first thing a run writes after its lock)."""
    path = os.path.join(model_dir, RUN_MARKER)
    if not os.path.exists(path):
        write_json(path, {"created": _now(), "host": platform.node(), "command": command})
