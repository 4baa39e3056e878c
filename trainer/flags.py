"""Every training flag, its validator, and the flags -> Config conversion.

This is the only module that reads absl flags; everything below it takes a `Config`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

from absl import flags

from models import registry
from trainer.loop import resume
from trainer.config import (BEST_METRICS, Config, parse_early_stopping_start,
                            parse_profile_steps, parse_randaugment)

_D = Config()  # every flag's default is the Config field's

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored")
PRECISIONS = ("none", "bfloat16", "float16", "auto")
OPTIMIZERS = ("adam", "adamw", "sgd")

# --- data -----------------------------------------------------------------------------------
flags.DEFINE_string("data_dir", _D.data_dir, "Dataset root holding train/, valid/ (and test/) "
                    "with one folder per class, or a packed folder written by `python -m "
                    "data.pack` (TFRecord shards and manifest.json); local or s3://BUCKET/PREFIX.")
flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, TensorBoard events, "
                    "results.json. Starting again with the same model_dir resumes. A local "
                    "path without glob characters (*?[]); a new or empty folder, or a run's; "
                    "one process writes it at a time (model_dir/.lock).")
flags.DEFINE_integer("image_size", _D.image_size, "Images are decoded and resized to image_size^2.",
                     lower_bound=8)
flags.DEFINE_enum("cache_images", _D.cache_images, ["auto", "memory", "disk", "none"],
                  "Decoded training images: `memory` decodes the training set once into memory "
                  "(image_size^2*3 bytes each, on every worker); `disk` once into chunk files "
                  "under --data_cache_dir/decoded (memory stays flat; rebuilt when the source "
                  "files or image size change); `none` decodes at every use; `auto`: memory "
                  "when it fits --cache_memory_fraction of the memory available (the cgroup "
                  "limit where there is one), else disk when --data_cache_dir has room, else "
                  "none. Evaluation splits are kept in memory when they fit too.")
flags.DEFINE_float("cache_memory_fraction", _D.cache_memory_fraction, "The share of the "
                   "available memory that --cache_images=auto or memory may fill with decoded "
                   "images (the model, the optimizer and TensorFlow need the rest).",
                   lower_bound=1e-6, upper_bound=0.95)
flags.DEFINE_float("crop_min_area", _D.crop_min_area, "Random-resized crop: smallest fraction of the image "
                   "area kept; 1 disables cropping.", lower_bound=0.01, upper_bound=1.0)
flags.DEFINE_float("eval_crop", _D.eval_crop, "Evaluation pixels (every evaluation, "
                   "trainer.evaluate, the export's serving signature, the TFLite input): 1 "
                   "squashes the whole image to image_size^2 (as training decodes it); F < 1 "
                   "resizes the short side to floor(image_size/F), keeping the aspect ratio, and "
                   "takes the centre image_size^2 (timm/big_vision; 0.875 is common).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_boolean("random_flip", _D.random_flip, "Random horizontal flips in training.")
flags.DEFINE_boolean("skip_unknown_classes", _D.skip_unknown_classes, "Leave out valid/test images whose class "
                     "is not in train, instead of stopping.")
flags.DEFINE_enum("on_bad_file", _D.on_bad_file, ["skip", "fail"], "Files the data check cannot decode "
                  "(empty, truncated, HTML pages named .jpg): `skip` leaves them out and lists "
                  "them in model_dir/data_report.txt; `fail` stops before training.")
flags.DEFINE_integer("max_image_pixels", _D.max_image_pixels, "Images whose header states "
                     "more pixels (width x height) are bad files, never decoded: in the data "
                     "check, the caches, evaluation and the export's decoder (a small file can "
                     "decode to a huge image). 0: no limit.", lower_bound=0)
# --- model ----------------------------------------------------------------------------------
flags.DEFINE_enum("model", _D.model, registry.model_names(), "Model architecture "
                  "(--list_models describes them).")
flags.DEFINE_boolean("fused_batchnorm", _D.fused_batchnorm, "BatchNormalization as one fused "
                     "op (FusedBatchNormV3, as tf_keras had it; models/batchnorm.py): same "
                     "variables and files as Keras' layer, 1.3-1.8x faster ResNet50 steps on "
                     "CPU. --nofused_batchnorm builds Keras 3's stock (unfused) layers.")
flags.DEFINE_boolean("list_models", _D.list_models, "Print the model names with a one-line description "
                     "each and exit (no other flag needed).")
# --- fine-tuning ----------------------------------------------------------------------------
flags.DEFINE_string("pretrained", _D.pretrained, "Start from these weights: `imagenet` (keras.applications' "
                    "backbone weights, downloaded once into ~/.keras/models), a .keras or "
                    ".weights.h5 file, or the --model_dir of an earlier run (its latest "
                    "checkpoint). Layers are matched by name; the head (logits) is replaced when "
                    "the class count differs. Not used when --model_dir already holds a "
                    "checkpoint (resume).")
flags.DEFINE_float("freeze_backbone_epochs", _D.freeze_backbone_epochs, "Train only the head for this many epochs "
                   "(the frozen backbone's BatchNorm in inference mode), then everything.",
                   lower_bound=0.0)
flags.DEFINE_float("backbone_lr_multiplier", _D.backbone_lr_multiplier, "The backbone's learning rate is the "
                   "schedule's times this; the head's is the schedule's (weight decay is not "
                   "scaled).", lower_bound=0.0)
# --- batch and optimisation -----------------------------------------------------------------
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size (per replica with --scale_batch).",
                     lower_bound=1)
flags.DEFINE_boolean("scale_batch", _D.scale_batch, "Read --batch_size as per replica: the global batch "
                     "is batch_size x replicas.")
flags.DEFINE_enum("optimizer", _D.optimizer, OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("base_lr", _D.base_lr, "Peak learning rate (after warmup, before scaling).",
                   lower_bound=0.0)
flags.DEFINE_boolean("scale_lr", _D.scale_lr, "Multiply --base_lr by the replica count (linear "
                     "scaling rule).")
flags.DEFINE_float("warmup_epochs", _D.warmup_epochs, "Linear warmup length in epochs, then cosine decay to 0.",
                   lower_bound=0.0)
flags.DEFINE_float("weight_decay", _D.weight_decay, "Decoupled weight decay (adamw, sgd); biases and "
                   "normalisation scales/offsets are not decayed.", lower_bound=0.0)
flags.DEFINE_float("momentum", _D.momentum, "SGD (Nesterov) momentum.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("clip_grad_norm", _D.clip_grad_norm, "Clip by the global norm of the all-reduced gradient "
                   "(across replicas); 0 disables.", lower_bound=0.0)
flags.DEFINE_integer("grad_accum_steps", _D.grad_accum_steps, "Split each replica's batch into N micro-batches "
                     "and sum their gradients before one optimizer update: the update of the "
                     "whole batch with 1/N of the activation memory (BatchNorm sees "
                     "micro-batches). --batch_size stays the batch per update.", lower_bound=1)
# --- training recipes -----------------------------------------------------------------------
flags.DEFINE_float("label_smoothing", _D.label_smoothing, "Cross-entropy against (1-e)*target + e/classes; the "
                   "reported training loss is this smoothed loss, evaluation's the plain one.",
                   lower_bound=0.0)
flags.DEFINE_float("mixup_alpha", _D.mixup_alpha, "MixUp: each training image and its label are mixed "
                   "with another of its replica batch by a Beta(a, a) weight; 0 disables. With "
                   "--cutmix_alpha too, each batch uses one of the two, chosen at random.",
                   lower_bound=0.0)
flags.DEFINE_float("cutmix_alpha", _D.cutmix_alpha, "CutMix: a box from another image of the replica batch "
                   "is pasted in, labels mixed by area, box area from Beta(a, a); 0 disables.",
                   lower_bound=0.0)
flags.DEFINE_string("randaugment", _D.randaugment, "N,M: RandAugment, N operations of magnitude M (0-10; "
                    "e.g. 2,9) drawn per training image from 14 (colour, contrast, rotate, "
                    "shear, translate, solarize, ...), seeded like the crops so resume stays "
                    "exact; empty: off.")
flags.DEFINE_float("ema_decay", _D.ema_decay, "Keep an exponential moving average of the weights (e.g. "
                   "0.999; decay warmed up as min(decay, (1+t)/(10+t)) at update t): evaluation, "
                   "best checkpoint choice, model.keras and the export use the averaged weights. "
                   "0 disables.", lower_bound=0.0)
# --- duration -------------------------------------------------------------------------------
flags.DEFINE_float("epochs", _D.epochs, "Training length in epochs (fractions allowed).",
                   lower_bound=0.0)
flags.DEFINE_integer("train_steps", _D.train_steps, "Training length in steps; overrides --epochs when > 0.",
                     lower_bound=0)
flags.DEFINE_integer("steps_per_loop", _D.steps_per_loop, "Steps per tf.function call; one console line and one "
                     "set of summaries per loop.", lower_bound=1)
flags.DEFINE_integer("eval_every_steps", _D.eval_every_steps, "Evaluate on valid every N steps (0: once per "
                     "epoch).", lower_bound=0)
flags.DEFINE_integer("checkpoint_every_steps", _D.checkpoint_every_steps, "Save a checkpoint every N steps (and at "
                     "the end).", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "How many recent checkpoints to keep.", lower_bound=1)
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Global evaluation batch (0: the training global "
                     "batch).", lower_bound=0)
# --- distribution and numerics --------------------------------------------------------------
flags.DEFINE_enum("distribution_strategy", _D.distribution_strategy, STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_float("collective_timeout", _D.collective_timeout, "multi_worker_mirrored: "
                   "seconds a worker waits for its peers (a collective, a lost peer's "
                   "heartbeats: min(this, 30 s)) before it exits with code 69 and one line "
                   "naming the peer.", lower_bound=1.0)
flags.DEFINE_integer("cpu_devices", _D.cpu_devices, "Split the host CPU into N logical devices so that "
                     "`mirrored` runs N replicas on a machine without GPUs (0: no split).",
                     lower_bound=0)
flags.DEFINE_enum("mixed_precision", _D.mixed_precision, PRECISIONS, "Compute dtype; float16 "
                  "uses dynamic loss scaling. auto: bfloat16 where the hardware runs it natively "
                  "(CPUs with AVX512_BF16 or AMX, GPUs of compute capability 8.0+), float16 on "
                  "older GPUs, float32 otherwise (trainer/loop/precision.py); the choice and the "
                  "reason are printed and kept in plan.json.")
flags.DEFINE_boolean("xla", _D.xla, "Compile the replica step with XLA (jit_compile).")
flags.DEFINE_integer("seed", _D.seed, "Seed for weights, data order and augmentation.",
                     lower_bound=0, upper_bound=2**32 - 1)
flags.DEFINE_boolean("deterministic", _D.deterministic, "Turn on TensorFlow op determinism: an interrupted "
                     "and resumed run ends with weights bit-identical to an uninterrupted one "
                     "(slower).")
# --- best checkpoint, early stopping, class balance, calibrated export --------------------------
flags.DEFINE_enum("best_metric", _D.best_metric, list(BEST_METRICS), "The valid metric that "
                  "picks checkpoints/best (loss: lower is better).")
flags.DEFINE_integer("early_stopping_patience", _D.early_stopping_patience, "Stop after this "
                     "many valid evaluations without a better --best_metric; the outputs then "
                     "hold the best checkpoint's weights. 0: off.", lower_bound=0)
flags.DEFINE_string("early_stopping_start", _D.early_stopping_start, "Valid evaluations "
                    "before this point never count against --early_stopping_patience (they may "
                    "still be the best): `warmup` (the end of the learning-rate warmup, so a "
                    "rising rate stops nothing), N or Nsteps (a step), Xepochs (fractions "
                    "allowed, like --epochs), or a fraction 0 <= F < 1 written with a decimal "
                    "point (that share of the run's steps, e.g. 0.25).")
flags.DEFINE_enum("class_weight", _D.class_weight, ["none", "balanced"], "`balanced` weighs "
                  "each training example's loss by n_images / (n_classes * n_images_of_its_class)"
                  " of the train split (evaluation losses stay unweighted).")
flags.DEFINE_boolean("balanced_sampling", _D.balanced_sampling, "Each epoch draws its "
                     "positions class by class evenly (a class uniformly, then one of its images;"
                     " minority classes repeat), still a function of seed and epoch, so resume "
                     "stays exact. Needs --cache_images=memory or none (auto then never picks "
                     "disk).")
flags.DEFINE_float("unknown_below", _D.unknown_below, "The exported serving signature returns "
                   "the class name `unknown` when the calibrated top-1 probability is below "
                   "this; 0: off.", lower_bound=0.0, upper_bound=1.0)
# --- TensorBoard extras ---------------------------------------------------------------------
flags.DEFINE_boolean("eval_figures", _D.eval_figures, "At each evaluation, the split's "
                     "confusion matrix and a gallery of misclassified images, drawn from the "
                     "evaluation's own pass (no other pass over the split); at the end, "
                     "each split's reliability diagram too.")
flags.DEFINE_boolean("sample_images", _D.sample_images, "Once per run, the same nine "
                     "training images before and after augmentation, titled with their classes "
                     "(train/sample_images, train/sample_images_unaugmented).")
flags.DEFINE_integer("high_loss_scan", _D.high_loss_scan, "At each valid evaluation, scan "
                     "this many training images (a seeded sample; all if the set is smaller) and "
                     "show the 12 with the highest loss, titled with label and prediction "
                     "(train/high_loss: likely mislabelled). 0: off.", lower_bound=0)
flags.DEFINE_boolean("summary_histograms", _D.summary_histograms, "Weight histograms each loop and the global "
                     "gradient norm (one more all-reduce per step).")
flags.DEFINE_string("profile_steps", _D.profile_steps, "A,B: trace the loops covering training steps A..B "
                    "(1-based) with tf.profiler into model_dir/train (Profile tab; needs "
                    "tensorboard-plugin-profile to view); empty: off.")

flags.DEFINE_string("data_cache_dir", _D.data_cache_dir, "Where --data_dir=s3://BUCKET/PREFIX is synced "
                    "to (as DATA_CACHE_DIR/BUCKET/PREFIX) before training; every worker syncs "
                    "its own copy.")
flags.DEFINE_boolean("s3_anon", _D.s3_anon, "Read S3 anonymously (public buckets); otherwise the "
                     "standard AWS credential chain (environment, ~/.aws) is used.")
flags.DEFINE_string("s3_endpoint_url", _D.s3_endpoint_url, "Endpoint of an S3-compatible store (MinIO, Ceph, "
                    "SeaweedFS); default: AWS.")
flags.DEFINE_boolean("s3_delete_removed", _D.s3_delete_removed, "The S3 sync deletes local "
                     "files (not hidden ones) under DATA_CACHE_DIR/BUCKET/PREFIX that are no "
                     "longer in the bucket; off: they are kept (and trained on), and the sync's "
                     "summary says how many.")
flags.DEFINE_string("data_service", _D.data_service, "grpc://HOST:PORT of a tf.data service "
                    "dispatcher (`python -m data.service`): training input is decoded and "
                    "augmented by its workers, which must see --data_dir at the same path. "
                    "Empty: in this process.")
flags.DEFINE_float("data_service_timeout", _D.data_service_timeout, "--data_service: seconds "
                   "without a training batch from the service (a dead worker or dispatcher), or "
                   "for the dispatcher to answer at start, before the run saves a checkpoint of "
                   "the last completed step and exits with code 75.")
flags.DEFINE_boolean("synthetic_data", _D.synthetic_data, "Train on in-memory random images instead of "
                     "--data_dir (no evaluation): the model's compute ceiling on this host.")
flags.DEFINE_integer("synthetic_classes", _D.synthetic_classes, "Class count with --synthetic_data.",
                     lower_bound=2)
flags.DEFINE_boolean("export_at_end", _D.export_at_end, "Export a SavedModel for serving when training ends.")

# --- recovery and resume --------------------------------------------------------------------
flags.DEFINE_enum("on_nan", _D.on_nan, ["stop", "rollback"], "A loop whose loss or weights are "
                  "not finite: `stop` ends the run (nothing of it saved); `rollback` restores the "
                  "latest checkpoint (every checkpoint is checked finite before it is saved), "
                  "skips the batches from there to the end of the failed loop and goes on, at "
                  f"most {resume.MAX_ROLLBACKS} times per run.")
flags.DEFINE_list("allow_change", _D.allow_change, "On resume, accept these flags differing "
                  "from the run's saved config (e.g. epochs,base_lr); each accepted change is "
                  "described in one line. Without it a change that alters what the checkpoint "
                  f"means is refused. Changeable: {', '.join(resume.CHANGEABLE)}; and `data`: "
                  "split files differing from those the run began with (data_fingerprint.json).")
flags.DEFINE_list("debug_nan_batches", _D.debug_nan_batches, "Testing aid: data positions "
                  "(0-based global batch numbers) whose training loss is made NaN, to exercise "
                  "--on_nan.")

flags.DEFINE_boolean("debug_record_batches", _D.debug_record_batches, "Testing aid: write the "
                     "ids (indices in the sorted train file list) of every global step's "
                     "images to model_dir/batch_ids.tsv, in replica order.")

flags.mark_flags_as_required(["model_dir"])


@flags.multi_flags_validator(["data_dir", "synthetic_data"],
                             message="--data_dir is required (unless --synthetic_data)")
def _data_dir_given(values):
    return bool(values["data_dir"]) or values["synthetic_data"]


@flags.multi_flags_validator(["synthetic_data", "train_steps"],
                             message="--synthetic_data needs --train_steps > 0 (it has no epochs)")
def _synthetic_needs_steps(values):
    return not values["synthetic_data"] or values["train_steps"] > 0


@flags.validator("profile_steps", message="--profile_steps must be two step numbers A,B with "
                 "1 <= A <= B, e.g. 20,30 (or empty)")
def _profile_steps(value):
    try:
        parse_profile_steps(value)
    except ValueError:
        return False
    return True


@flags.validator("early_stopping_start", message="--early_stopping_start must be warmup, a "
                 "step N (or Nsteps), Xepochs with X >= 0, or a fraction 0 <= F < 1 of the run "
                 "written with a decimal point (e.g. 0.25)")
def _early_stopping_start(value):
    try:
        parse_early_stopping_start(value)
    except ValueError:
        return False
    return True


@flags.validator("data_service", message="--data_service must be grpc://HOST:PORT (or empty)")
def _data_service(value):
    from data import service  # no TensorFlow at import
    try:
        return not value or bool(service.parse_address(value))
    except ValueError:
        return False


@flags.validator("randaugment", message="--randaugment must be N,M with N >= 1 operations and "
                 "a magnitude 0 <= M <= 10, e.g. 2,9 (or empty)")
def _randaugment(value):
    try:
        parse_randaugment(value)
    except ValueError:
        return False
    return True


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


def _data_dir_has_splits(value) -> bool:
    if not value:
        return True  # _data_dir_given reports a missing --data_dir
    if value.startswith("s3://"):
        if not value[len("s3://"):].split("/")[0]:
            raise flags.ValidationError("an S3 source looks like s3://BUCKET/PREFIX")
        return True  # synced into --data_cache_dir and checked there
    if not os.path.isdir(value):
        raise flags.ValidationError("no such folder")
    if os.path.isfile(os.path.join(value, "manifest.json")):
        return True  # packed data (data/pack.py): its shards are checked when it is opened
    for split in ("train", "valid"):
        if not os.path.isdir(os.path.join(value, split)):
            raise flags.ValidationError(f"has no {split}/ folder (the layout is train/, valid/ "
                                        f"and optionally test/, one folder per class)")
    return True


def _model_dir_can_be_written(value) -> bool:
    if value is None:
        return True
    if not value.strip():
        raise flags.ValidationError("must not be empty")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise flags.ValidationError(
            "must be a local folder, not a URL: TensorFlow would write the checkpoints and "
            "events to the URL and the trainer its own files to a local folder of that name "
            "(mount the bucket, e.g. with gcsfuse or s3fs, and give the mount's path)")
    glob = "".join(sorted(set(value) & set("*?[]")))
    if glob:
        raise flags.ValidationError(
            f"must not contain the glob characters {glob}: TensorFlow deletes old "
            f"checkpoints by glob pattern, so a sibling run's could match and go, or none of "
            f"this run's ever be cleaned up")
    path = os.path.abspath(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise flags.ValidationError("exists and is not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise flags.ValidationError(f"cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise flags.ValidationError(f"{parent} is not writable")
    return True


flags.register_validator("data_dir", _data_dir_has_splits)
flags.register_validator("model_dir", _model_dir_can_be_written)
for _name in ("collective_timeout", "crop_min_area", "eval_crop", "base_lr", "warmup_epochs",
              "weight_decay", "momentum", "clip_grad_norm", "epochs", "label_smoothing",
              "mixup_alpha", "cutmix_alpha", "ema_decay", "freeze_backbone_epochs",
              "backbone_lr_multiplier"):
    # absl's bounds let nan (and inf where there is no upper bound) through.
    flags.register_validator(_name, math.isfinite, message="must be a finite number")
flags.register_validator("data_service_timeout", lambda value: 1 <= value < math.inf,
                         message="must be a finite number of seconds >= 1")
flags.register_validator("base_lr", lambda value: value > 0,
                         message="must be > 0 (a zero learning rate trains nothing)")
flags.register_validator("eval_crop", lambda value: value > 0,
                         message="must be > 0 (the fraction of the resized short side kept)")


flags.register_validator("label_smoothing", lambda value: value < 1,
                         message="must be below 1 (1 would ignore the labels)")
flags.register_validator("ema_decay", lambda value: value < 1,
                         message="must be below 1 (0 disables; 0.999 is typical)")
flags.register_validator("backbone_lr_multiplier", lambda value: value > 0,
                         message="must be > 0 (use --freeze_backbone_epochs to freeze)")


@flags.multi_flags_validator(["batch_size", "grad_accum_steps"])
def _batch_splits_into_micro_batches(values):
    if values["batch_size"] % values["grad_accum_steps"]:
        raise flags.ValidationError(
            f"--batch_size={values['batch_size']} does not divide into "
            f"--grad_accum_steps={values['grad_accum_steps']} micro-batches")
    return True


@flags.multi_flags_validator(["pretrained", "model"])
def _pretrained_source_exists(values):
    source, model = values["pretrained"], values["model"]
    if not source:
        return True
    if source == "imagenet":
        if not registry.has_imagenet_weights(model):
            having = [n for n in registry.model_names() if registry.has_imagenet_weights(n)]
            raise flags.ValidationError(f"--pretrained=imagenet: --model={model} has no ImageNet "
                                        f"weights (these have: {', '.join(having)})")
        return True
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise flags.ValidationError(f"--pretrained={source}: a folder, but not the model_dir "
                                        f"of a run (no config.json)")
        return True
    if not os.path.exists(source):
        raise flags.ValidationError(f"--pretrained={source}: no such file or folder (give "
                                    f"imagenet, a .keras or .weights.h5 file, or a run's "
                                    f"model_dir)")
    if not (source.endswith(".keras") or source.endswith(".weights.h5")):
        raise flags.ValidationError(f"--pretrained={source}: not a .keras or .weights.h5 file")
    return True


@flags.multi_flags_validator(["weight_decay", "optimizer"],
                             message="--weight_decay > 0 needs --optimizer=adamw or sgd (adam has "
                                     "no decoupled weight decay and would ignore it)")
def _weight_decay_needs_optimizer(values):
    return values["weight_decay"] == 0 or values["optimizer"] != "adam"


@flags.multi_flags_validator(["model", "image_size"])
def _image_size_fits_model(values):
    smallest = registry.min_image_size(values["model"])
    if values["image_size"] < smallest:
        raise flags.ValidationError(f"--model={values['model']} needs --image_size >= {smallest}")
    return True


@flags.multi_flags_validator(["balanced_sampling", "cache_images"],
                             message="--balanced_sampling needs --cache_images=memory or none "
                                     "(the disk cache is read in blocks)")
def _balanced_sampling_reads_any_image(values):
    return not values["balanced_sampling"] or values["cache_images"] != "disk"


@flags.multi_flags_validator(["data_service", "cache_images"],
                             message="--cache_images=memory cannot go with --data_service (the "
                                     "images would be decoded here and shipped to the workers "
                                     "in the dataset's graph); use auto, disk or none")
def _service_decodes_itself(values):
    return not values["data_service"] or values["cache_images"] != "memory"


@flags.validator("allow_change")
def _allow_change_names(value):
    unknown = [name for name in value if name not in resume.ALLOWABLE]
    if unknown:
        raise flags.ValidationError(f"{', '.join(unknown)} cannot be changed on resume (these "
                                    f"can: {', '.join(resume.ALLOWABLE)})")
    return True


@flags.validator("debug_nan_batches", message="--debug_nan_batches must be batch numbers >= 0")
def _debug_nan_batches(value):
    return all(item.isdigit() for item in value)


def config_from_flags(values: flags.FlagValues = flags.FLAGS) -> Config:
    """One flag per Config field, same name (list flags joined with commas)."""
    def value(name):
        v = values[name].value
        return ",".join(v) if isinstance(v, list) else v
    return Config(**{field.name: value(field.name) for field in dataclasses.fields(Config)})


def config_from_argv(argv: list[str]) -> Config:
    """Parse `argv` (without the program name) afresh and return its Config; for tests and tools.
    The flags are left unparsed again, also when parsing fails: the Config is what carries them."""
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["trainer"] + list(argv))
        return config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def _asks_for_model_list(argv: list[str]) -> bool:
    return any(arg in ("--list_models", "--list_models=true", "--list_models=True",
                       "--list_models=1") for arg in argv[1:])


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag or flagfile is one line on stderr and exit code 2.
    `--list_models` on the command line prints the models and exits 0 before any other flag
    rule (a required --model_dir, say) is checked."""
    if _asks_for_model_list(argv):
        print(registry.describe())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        message = message.removeprefix("ERROR:: ")  # absl's "Unable to open flagfile" prefix
        print(f"trainer: flag error: {message}", file=sys.stderr)
        sys.exit(2)
