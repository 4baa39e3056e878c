"""A finished (or running) training run read back from its model_dir, for the tools.

`SavedRun.load(model_dir)` reads config.json, classes.json and plan.json without TensorFlow, so
that a wrong --model_dir is answered at once. `checkpoint_path` resolves latest|best|PATH and
`restore_model` builds the run's model and restores only its weights from that checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

# Not trainer.checkpoints: it imports TensorFlow, and these checks must answer before that.
BEST_STATE_FILE = "best.json"  # as trainer.checkpoints.BEST_STATE_FILE

STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"


class RunError(ValueError):
    """The run directory or checkpoint cannot be used; str() is a one-line message."""


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

    def restore_model(self, path: str):
        """The run's model in float32 with the weights of checkpoint `path` (only the model is
        restored: the optimizer slots and step in the checkpoint are left unread). A run
        trained with --ema_decay gets the averaged weights, as its evaluations and export did."""
        import keras
        import tensorflow as tf

        from models import registry
        keras.mixed_precision.set_global_policy("float32")
        model = registry.build(self.model_name, len(self.class_names), self.image_size)
        try:
            status = tf.train.Checkpoint(model=model).restore(path).expect_partial()
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:
            raise RunError(f"checkpoint {path} does not hold the weights of a "
                           f"{self.model_name} model with {len(self.class_names)} classes "
                           f"({str(e).splitlines()[0][:200]})") from None
        if float(self.config.get("ema_decay") or 0) > 0:
            from trainer.loop import ema
            try:
                ema.restore_into(model, path)
            except (AssertionError, ValueError) as e:
                raise RunError(f"checkpoint {path} lacks the averaged weights of a run with "
                               f"--ema_decay ({str(e).splitlines()[0][:200]})") from None
        return model


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
