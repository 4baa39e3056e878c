"""Every training flag, its validator, and the flags -> Config conversion.

This is the only module that reads absl flags; everything below it takes a `Config`.
"""
from __future__ import annotations

import dataclasses
import sys

from absl import flags

from models import registry
from trainer.config import Config

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored")
PRECISIONS = ("none", "bfloat16", "float16")
OPTIMIZERS = ("adam", "adamw", "sgd")

# --- data -----------------------------------------------------------------------------------
flags.DEFINE_string("data_dir", None, "Dataset root holding train/, valid/ (and test/) with one "
                    "folder per class.")
flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, TensorBoard events, "
                    "results.json. Starting again with the same model_dir resumes.")
flags.DEFINE_integer("image_size", 224, "Images are decoded and resized to image_size^2.",
                     lower_bound=8)
flags.DEFINE_boolean("cache_images", True, "Keep decoded uint8 images in memory after the first "
                     "epoch (image_size^2*3 bytes each).")
flags.DEFINE_float("crop_min_area", 0.25, "Random-resized crop: smallest fraction of the image "
                   "area kept; 1 disables cropping.", lower_bound=0.01, upper_bound=1.0)
flags.DEFINE_boolean("random_flip", True, "Random horizontal flips in training.")
flags.DEFINE_boolean("skip_unknown_classes", False, "Leave out valid/test images whose class "
                     "is not in train, instead of stopping.")
# --- model ----------------------------------------------------------------------------------
flags.DEFINE_enum("model", "resnet50", registry.model_names(), "Model architecture.")
# --- batch and optimisation -----------------------------------------------------------------
flags.DEFINE_integer("batch_size", 64, "Global batch size (per replica with --scale_batch).",
                     lower_bound=1)
flags.DEFINE_boolean("scale_batch", False, "Read --batch_size as per replica: the global batch "
                     "is batch_size x replicas.")
flags.DEFINE_enum("optimizer", "adam", OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("base_lr", 1e-3, "Peak learning rate (after warmup, before scaling).",
                   lower_bound=0.0)
flags.DEFINE_boolean("scale_lr", False, "Multiply --base_lr by the replica count (linear "
                     "scaling rule).")
flags.DEFINE_float("warmup_epochs", 1.0, "Linear warmup length in epochs, then cosine decay to 0.",
                   lower_bound=0.0)
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (adamw, sgd).", lower_bound=0.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("clip_grad_norm", 0.0, "Clip by the global norm of the all-reduced gradient "
                   "(across replicas); 0 disables.", lower_bound=0.0)
# --- duration -------------------------------------------------------------------------------
flags.DEFINE_float("epochs", 10.0, "Training length in epochs (fractions allowed).",
                   lower_bound=0.0)
flags.DEFINE_integer("train_steps", 0, "Training length in steps; overrides --epochs when > 0.",
                     lower_bound=0)
flags.DEFINE_integer("steps_per_loop", 50, "Steps per tf.function call; one console line and one "
                     "set of summaries per loop.", lower_bound=1)
flags.DEFINE_integer("eval_every_steps", 0, "Evaluate on valid every N steps (0: once per "
                     "epoch).", lower_bound=0)
flags.DEFINE_integer("checkpoint_every_steps", 500, "Save a checkpoint every N steps (and at "
                     "the end).", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.", lower_bound=1)
flags.DEFINE_integer("eval_batch_size", 0, "Global evaluation batch (0: the training global "
                     "batch).", lower_bound=0)
# --- distribution and numerics --------------------------------------------------------------
flags.DEFINE_enum("distribution_strategy", "mirrored", STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into N logical devices so that "
                     "`mirrored` runs N replicas on a machine without GPUs (0: no split).",
                     lower_bound=0)
flags.DEFINE_enum("mixed_precision", "none", PRECISIONS, "Compute dtype; float16 uses dynamic "
                  "loss scaling.")
flags.DEFINE_boolean("xla", False, "Compile the replica step with XLA (jit_compile).")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")
flags.DEFINE_boolean("deterministic", False, "Turn on TensorFlow op determinism: an interrupted "
                     "and resumed run ends with weights bit-identical to an uninterrupted one "
                     "(slower).")

flags.mark_flags_as_required(["data_dir", "model_dir"])


@flags.multi_flags_validator(["cpu_devices", "distribution_strategy"],
                             message="--cpu_devices > 1 needs --distribution_strategy=mirrored "
                                     "(one_device runs one replica; multi_worker_mirrored uses "
                                     "one device per worker)")
def _cpu_devices_need_mirrored(values):
    return values["cpu_devices"] <= 1 or values["distribution_strategy"] == "mirrored"


@flags.multi_flags_validator(["epochs", "train_steps"],
                             message="give a training length: --epochs > 0 or --train_steps > 0")
def _some_duration(values):
    return values["epochs"] > 0 or values["train_steps"] > 0


def config_from_flags(values: flags.FlagValues = flags.FLAGS) -> Config:
    """One flag per Config field, same name."""
    return Config(**{field.name: values[field.name].value for field in dataclasses.fields(Config)})


def config_from_argv(argv: list[str]) -> Config:
    """Parse `argv` (without the program name) afresh and return its Config; for tests and tools."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["trainer"] + list(argv))
    return config_from_flags()


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag or flagfile is one line on stderr and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"trainer: flag error: {message}", file=sys.stderr)
        sys.exit(2)
