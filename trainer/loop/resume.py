"""What a resumed run may change, compared with the config it was saved with.

A checkpoint means something only together with the flags it was trained under: the model and
its input size, the optimizer's slot variables, the loss-scale wrapper of float16, the weight
averages, and the data position and learning-rate schedule counted in steps of one global batch
from one seed. Each start compares its config with the run's current one (the last start's entry
in runs.jsonl, else config.json):

- FIXED flags never change (the checkpoint cannot hold them): a new --model_dir is needed.
- CHANGEABLE flags are refused unless `--allow_change=FLAG[,...]` names them; an accepted change
  is described in one line (`describe`), and the learning-rate ones are folded into the plan by
  `continue_plan` so that the rate goes on from where it was.
- CHANGEABLE_INPUTS are not flags: `--allow_change=data` accepts a dataset whose files differ from
  the ones the run began with (trainer/loop/inputs.py compares data/fingerprint.py's record).
- Every other flag (paths, cadence, logging, evaluation, caching, ...) may differ freely.

Pure Python (no TensorFlow): trainer/flags.py imports it to validate --allow_change.
"""
from __future__ import annotations

import dataclasses

# A run with --on_nan=rollback gives up after this many rollbacks.
MAX_ROLLBACKS = 3

FIXED = {
    "model": "the checkpoint holds another architecture's weights",
    "image_size": "the model was built for that input size",
    "optimizer": "the checkpoint holds that optimizer's slot variables",
    "synthetic_data": "the run's classes, plan and data position belong to its data "
                      "(classes.json)",
}

# flag -> what accepting the change does (completed with numbers by `describe`).
CHANGEABLE = {
    "batch_size": "the step count, the epoch position and the schedule continue from the "
                  "number of images seen",
    "scale_batch": "the step count, the epoch position and the schedule continue from the "
                   "number of images seen",
    "epochs": "the schedule is re-planned",
    "train_steps": "the schedule is re-planned",
    "base_lr": "the peak learning rate changes",
    "scale_lr": "the peak learning rate changes",
    "warmup_epochs": "the warmup length changes",
    "seed": "a new data order and augmentation from this step on (the position in the epoch "
            "is kept)",
    "weight_decay": "takes effect from this step on",
    "momentum": "takes effect from this step on",
    "clip_grad_norm": "takes effect from this step on",
    "label_smoothing": "takes effect from this step on (the logged training loss changes "
                       "meaning)",
    "mixup_alpha": "takes effect from this step on",
    "cutmix_alpha": "takes effect from this step on",
    "randaugment": "takes effect from this step on",
    "crop_min_area": "takes effect from this step on",
    "random_flip": "takes effect from this step on",
    "grad_accum_steps": "takes effect from this step on (the same update, other micro-batches)",
    "backbone_lr_multiplier": "takes effect from this step on",
    "freeze_backbone_epochs": "the frozen span is re-planned from the step count",
    "ema_decay": "the averages go on with the new decay",
    "mixed_precision": "the compute precision changes from this step on (weights stay float32)",
    "class_weight": "the loss weights per class change from this step on",
    "balanced_sampling": "the epochs' order changes from this step on",
    "early_stopping_start": "valid evaluations count against --early_stopping_patience from "
                            "the new start (those counted already stay counted; no early stop "
                            "before it)",
    "eval_crop": "evaluations from here on see other pixels (best-checkpoint comparisons and "
                 "early stopping mix the two policies); the export follows the new one",
}
# Not flags: what a resume finds changed around the run; `--allow_change=NAME` accepts it too.
# data: the split files differ from the run's data_fingerprint.json (data/fingerprint.py).
CHANGEABLE_INPUTS = {
    "data": "the step is kept, and each epoch's order is drawn over the new file list, so the "
            "rest of this epoch is not the batches it would have been (some of its images are "
            "seen twice or not at all)",
}
# Every name --allow_change takes.
ALLOWABLE = {**CHANGEABLE, **CHANGEABLE_INPUTS}
SCHEDULE_FLAGS = ("epochs", "train_steps", "base_lr", "scale_lr", "warmup_epochs")


class ResumeError(ValueError):
    """A refused change; str() is one line naming the flag, the old and the new value."""


def _show(value) -> str:
    return "''" if value == "" else str(value)


def check_config(saved: dict, config, allowed: list[str], model_dir: str) -> list[str]:
    """The CHANGEABLE flags that differ and are allowed; raises ResumeError for any other
    FIXED or CHANGEABLE difference (or for switching averaging or float16 on or off)."""
    new = dataclasses.asdict(config)
    changed = [name for name in list(FIXED) + list(CHANGEABLE)
               if name in saved and saved[name] != new[name]]
    for name in changed:
        old, value = _show(saved[name]), _show(new[name])
        if name in FIXED:
            raise ResumeError(f"--{name}={value} but the run in {model_dir!r} used {old}: "
                              f"{FIXED[name]}; use a new --model_dir")
        if name not in allowed:
            raise ResumeError(f"--{name}={value} but the run in {model_dir!r} used {old}; pass "
                              f"--allow_change={name} to accept it ({CHANGEABLE[name]}), or "
                              f"use a new --model_dir")
    if "ema_decay" in changed and (float(saved["ema_decay"]) > 0) != (config.ema_decay > 0):
        raise ResumeError(f"--ema_decay={config.ema_decay:g} but the run in {model_dir!r} used "
                          f"{float(saved['ema_decay']):g}: averaging cannot be switched on or "
                          f"off when resuming (the checkpoint holds the averages or not); use a "
                          f"new --model_dir")
    if "mixed_precision" in changed and "float16" in (saved["mixed_precision"],
                                                      config.mixed_precision):
        raise ResumeError(f"--mixed_precision={config.mixed_precision} but the run in "
                          f"{model_dir!r} used {saved['mixed_precision']}: float16's loss-scale "
                          f"state is in the checkpoint or not; use a new --model_dir")
    return changed


def describe(name: str, saved: dict, config) -> str:
    """One line saying what an accepted change of a non-schedule flag does."""
    return (f"--{name} changed from {_show(saved[name])} to "
            f"{_show(getattr(config, name))} (--allow_change): {CHANGEABLE[name]}")


def describe_cache_change(before: str, now: str) -> str:
    """One line for a resume whose --cache_images resolves otherwise than the last start's."""
    if {before, now} <= {"memory", "none"}:
        effect = "memory and none read the same order, so the batches are exactly those of an " \
                 "uninterrupted run"
    else:
        effect = ("the data position (epoch and step) is kept, but the disk cache reads its "
                  "blocks in another order than memory and none: the rest of this epoch draws "
                  "other batches, and some of its images are seen twice or not at all")
    return f"cache: {now} this time ({before} when the run last started): {effect}"
