"""The outer training loop: set up, restore, loop of loops, evaluation, checkpoints, finish.

Order of resume (each step needs the one before):
  1. strategy (logical CPU devices must exist before any op runs)
  2. class list: model_dir/classes.json when present, else the train folder names
  3. plan (global batch, learning rate, steps) from the config, replica count and train size
  4. model and optimizer in the strategy scope; optimizer built before the first traced step
  5. restore the latest checkpoint: weights, optimizer slots and the global step
  6. input pipeline started at the restored step: epoch = step // steps_per_epoch, and the
     position within that epoch is skipped, so the run continues with the very next batch
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from data import check, datasets, layout, service, source
from data.augment import Augment, Mix
from models import registry, transfer
from trainer import (checkpoints, distribute, evaluation, performance, pretrained, serving,
                     summaries)
from trainer.config import Config, RunPlan, parse_profile_steps, parse_randaugment
from trainer.ema import WeightAverage
from trainer.optimization import learning_rate_of_step, make_optimizer
from trainer.step import Metrics, StepFunctions

# Exit code meaning "interrupted cleanly, checkpoint saved: start me again" (EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Config fields that must not change when a model_dir is resumed.
RESUME_MUST_MATCH = ("model", "image_size")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; str() is a one-line message for the user."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at `step`."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


@dataclasses.dataclass
class Inputs:
    class_names: list[str]
    train: layout.SplitFiles
    eval_splits: dict[str, layout.SplitFiles]
    synthetic: bool = False
    source: object = None  # data.source.open_source(): builds the train and eval datasets

    @property
    def num_train_images(self) -> int:
        return SYNTHETIC_EPOCH_IMAGES if self.synthetic else len(self.train)


# An "epoch" of --synthetic_data, which has no dataset to define one.
SYNTHETIC_EPOCH_IMAGES = 10_000


def synthetic_inputs(config: Config) -> Inputs:
    names = [f"synthetic_{i:04d}" for i in range(config.synthetic_classes)]
    return Inputs(names, layout.SplitFiles("train", (), ()), {}, synthetic=True)


def _log(message: str) -> None:
    print(message, flush=True)


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ============================================================================================
# Data layout and the saved run description
# ============================================================================================
def read_inputs(config: Config) -> Inputs:
    if source.is_packed(config.data_dir):
        return read_packed_inputs(config)
    found = layout.train_class_names(config.data_dir)
    saved_path = os.path.join(config.model_dir, "classes.json")
    class_names = found
    if os.path.exists(saved_path):
        class_names = checkpoints.read_json(saved_path)
        if class_names != found:
            added = sorted(set(found) - set(class_names))
            removed = sorted(set(class_names) - set(found))
            raise TrainingError(
                f"the train classes of {config.data_dir!r} differ from the run in "
                f"{config.model_dir!r}: new {added or 'none'}, missing {removed or 'none'}")
    # The data check (data/check.py): every image decoded once by the training decoder (cached),
    # only readable files kept, the report written to model_dir before anything can stop.
    scanned = check.scan(config.data_dir, class_names,
                         skip_unknown_classes=config.skip_unknown_classes,
                         on_bad_file=config.on_bad_file,
                         cache_path=check.default_cache_path(config.data_dir, config.model_dir),
                         log=_log)
    report_path = scanned.report.write(config.model_dir)
    for warning in scanned.report.warnings:
        _log(f"warning: {warning}")
    if scanned.report.errors:
        raise TrainingError(scanned.report.error_line(report_path))
    eval_splits = {split: files for split, files in scanned.splits.items() if split != "train"}
    return Inputs(class_names, scanned.splits["train"], eval_splits,
                  source=datasets.FolderSource(config.data_dir))


def read_packed_inputs(config: Config) -> Inputs:
    """Packed data (data/pack.py): the shards are verified against the manifest, whose items
    passed the data check when packed; its report is copied into model_dir."""
    try:
        packed = source.open_source(config.data_dir, cache_dir=config.model_dir, log=_log)
    except source.DataError as e:
        raise TrainingError(str(e)) from None
    class_names = packed.manifest.class_names
    saved_path = os.path.join(config.model_dir, "classes.json")
    if os.path.exists(saved_path) and checkpoints.read_json(saved_path) != class_names:
        saved = checkpoints.read_json(saved_path)
        raise TrainingError(
            f"the train classes of {config.data_dir!r} differ from the run in "
            f"{config.model_dir!r}: new {sorted(set(class_names) - set(saved)) or 'none'}, "
            f"missing {sorted(set(saved) - set(class_names)) or 'none'}")
    for name in ("data_report.txt", "data_report.json"):
        if os.path.exists(os.path.join(config.data_dir, name)):
            with open(os.path.join(config.data_dir, name), encoding="utf-8") as f:
                checkpoints.atomic_write_text(os.path.join(config.model_dir, name), f.read())
    splits = packed.manifest.splits
    return Inputs(class_names, splits["train"],
                  {name: split for name, split in splits.items() if name != "train"},
                  source=packed)


def sync_from_s3(config: Config) -> str:
    """Sync --data_dir=s3://BUCKET/PREFIX into DATA_CACHE_DIR/BUCKET/PREFIX; returns that path.
    Incremental: a restart re-downloads nothing that is already complete."""
    from data import s3
    try:
        bucket, prefix = s3.parse_s3_url(config.data_dir)
    except ValueError as e:
        raise TrainingError(f"--data_dir: {e}") from None
    local = os.path.join(config.data_cache_dir, bucket, prefix)
    _log(f"syncing {config.data_dir} to {local}")
    try:
        summary = s3.sync(config.data_dir, local, anon=config.s3_anon,
                          endpoint_url=config.s3_endpoint_url, progress=False)
    except s3.S3SyncError as e:
        raise TrainingError(f"--data_dir: {e}") from None
    _log(summary.describe())
    if not summary.ok:
        raise TrainingError(f"--data_dir: {summary.failed} file(s) of {config.data_dir} failed "
                            f"to download and {len(summary.refused)} were refused; run again to "
                            f"retry (complete files are kept)")
    return local


def check_resume_compatible(config: Config) -> None:
    saved_path = os.path.join(config.model_dir, "config.json")
    if not os.path.exists(saved_path):
        return
    saved = checkpoints.read_json(saved_path)
    for field in RESUME_MUST_MATCH:
        if field in saved and saved[field] != getattr(config, field):
            raise TrainingError(
                f"--{field}={getattr(config, field)} but the run in {config.model_dir!r} used "
                f"{saved[field]}; use a new --model_dir")
    # The weight averages are in the checkpoint or not: they cannot be switched on or off.
    if (float(saved.get("ema_decay") or 0) > 0) != (config.ema_decay > 0):
        raise TrainingError(
            f"--ema_decay={config.ema_decay:g} but the run in {config.model_dir!r} used "
            f"{float(saved.get('ema_decay') or 0):g}; averaging cannot be switched on or off "
            f"when resuming (another non-zero decay is fine); use a new --model_dir")


def check_plan(config: Config, plan: RunPlan) -> None:
    for name, batch in (("--batch_size", plan.global_batch_size),
                        ("--eval_batch_size", plan.eval_global_batch_size)):
        if batch % plan.num_replicas:
            raise TrainingError(f"{name}: global batch {batch} does not divide by "
                                f"{plan.num_replicas} replicas")
    per_replica = plan.global_batch_size // plan.num_replicas
    if per_replica % config.grad_accum_steps:
        raise TrainingError(f"--grad_accum_steps={config.grad_accum_steps}: the batch of "
                            f"{per_replica} per replica does not divide into "
                            f"{config.grad_accum_steps} micro-batches")
    if plan.steps_per_epoch < 1:
        raise TrainingError(f"--batch_size: global batch {plan.global_batch_size} is larger than "
                            f"the {plan.num_train_images} training images")


# ============================================================================================
# The run
# ============================================================================================
def run(config: Config) -> dict:
    """Train (or resume) as configured; returns the results written to results.json."""
    # --- set up: strategy, data, plan ------------------------------------------------------
    strategy = distribute.make_strategy(config.distribution_strategy, config.cpu_devices)
    chief = distribute.is_chief(strategy)
    # Every worker saves (collective ops), but only the chief's files are kept.
    work_dir = config.model_dir if chief else tempfile.mkdtemp(prefix="worker-")
    check_resume_compatible(config)
    # The --pretrained donor is loaded first, so that a bad source (or no network for
    # imagenet) stops the run before the data check; not when a checkpoint will be restored.
    donor = None
    if config.pretrained and not tf.train.latest_checkpoint(
            os.path.join(config.model_dir, "checkpoints")):
        try:
            donor = pretrained.load_donor(config)
        except pretrained.PretrainedError as e:
            raise TrainingError(str(e)) from None
    saved_config = config
    if config.data_dir and config.data_dir.startswith("s3://"):
        config = dataclasses.replace(config, data_dir=sync_from_s3(config))
    inputs = synthetic_inputs(config) if config.synthetic_data else read_inputs(config)
    plan = RunPlan.make(config, strategy.num_replicas_in_sync, inputs.num_train_images)
    check_plan(config, plan)
    if chief:
        os.makedirs(config.model_dir, exist_ok=True)
        checkpoints.atomic_write_text(os.path.join(config.model_dir, "classes.json"),
                                      json.dumps(inputs.class_names, indent=1))
        checkpoints.atomic_write_text(os.path.join(config.model_dir, "config.json"),
                                      saved_config.to_json())
        checkpoints.atomic_write_text(os.path.join(config.model_dir, "plan.json"),
                                      json.dumps(dataclasses.asdict(plan), indent=2))
    try:
        return _train(config, plan, inputs, strategy, chief, work_dir, donor)
    finally:
        if not chief:
            shutil.rmtree(work_dir, ignore_errors=True)


def _train(config: Config, plan: RunPlan, inputs: Inputs, strategy, chief: bool,
           work_dir: str, donor: pretrained.Donor | None = None) -> dict:
    run_start = time.time()
    # --- model and optimizer ---------------------------------------------------------------
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
        [config.mixed_precision])
    with strategy.scope():
        model = registry.build(config.model, len(inputs.class_names), config.image_size)
        if donor is not None:
            report = transfer.copy_weights_by_name(donor.model, model, skip_head=donor.skip_head)
            if report.backbone_copied == 0:
                raise TrainingError(f"--pretrained={config.pretrained}: no layer of "
                                    f"{donor.description} matches a layer of --model="
                                    f"{config.model} by name and shape")
            _log(f"pretrained: {donor.description}: {report.describe()}")
        optimizer = make_optimizer(config, plan, model)
        # Averages of the initial (or pretrained) weights; restored below on resume.
        weight_average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        train_metrics, eval_metrics = Metrics.create("train"), Metrics.create("eval")
        gradient_norm = keras.metrics.Mean(name="gradient_norm") \
            if config.summary_histograms else None
    steps = StepFunctions(strategy, model, optimizer, global_batch_size=plan.global_batch_size,
                          train_metrics=train_metrics, eval_metrics=eval_metrics, xla=config.xla,
                          clip_grad_norm=config.clip_grad_norm, gradient_norm=gradient_norm,
                          time_input=not config.deterministic,
                          label_smoothing=config.label_smoothing,
                          grad_accum_steps=config.grad_accum_steps, weight_average=weight_average)
    ema_applied = weight_average.applied if weight_average else contextlib.nullcontext

    # --- restore -----------------------------------------------------------------------------
    keeper = checkpoints.CheckpointKeeper(
        os.path.join(work_dir, "checkpoints"), model=model, optimizer=optimizer, step=step,
        max_to_keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps,
        ema=weight_average.trackable if weight_average else None)
    restored = keeper.restore_latest(os.path.join(config.model_dir, "checkpoints"))
    # The best model by valid accuracy, kept apart from the latest K (state read from the chief).
    best = checkpoints.BestCheckpoint(
        os.path.join(work_dir, "checkpoints", "best"), keeper.checkpoint,
        state_directory=os.path.join(config.model_dir, "checkpoints", "best"))
    start_step = int(step.numpy())
    if restored:
        _log(f"resumed from {restored} at step {start_step} (epoch "
             f"{plan.epoch_of(start_step) + 1}, batch {start_step % plan.steps_per_epoch} of "
             f"the epoch)")
    if restored and start_step >= plan.total_steps:
        _log(f"the run in {config.model_dir} is finished ({start_step} of {plan.total_steps} "
             f"steps); results: {os.path.join(config.model_dir, 'results.json')}. Pass a larger "
             f"--train_steps or --epochs to train on.")
        return checkpoints.read_json(os.path.join(config.model_dir, "results.json")) if \
            os.path.exists(os.path.join(config.model_dir, "results.json")) else {}
    writers = summaries.Summaries(config.model_dir if chief else None)
    loss_log = StepLossLog(os.path.join(work_dir, "step_losses.tsv"))
    if start_step == 0:
        _write_run_description(config, plan, inputs, writers, strategy)

    # --- inputs from the restored position ---------------------------------------------------
    def train_fn(context):
        if inputs.synthetic:
            return datasets.synthetic_dataset(
                image_size=config.image_size, num_classes=len(inputs.class_names),
                global_batch_size=plan.global_batch_size, seed=config.seed,
                num_steps=plan.total_steps - start_step, context=context)
        dataset = inputs.source.train_dataset(
            inputs.train, image_size=config.image_size,
            global_batch_size=plan.global_batch_size, seed=config.seed, start_step=start_step,
            total_steps=plan.total_steps, cache=config.cache_images, context=context,
            cache_dir=config.data_cache_dir, log=_log,
            augment=Augment(config.crop_min_area, config.random_flip,
                            parse_randaugment(config.randaugment)),
            mix=Mix(len(inputs.class_names), config.mixup_alpha, config.cutmix_alpha))
        # --data_service: the same dataset, run by tf.data service workers (data/service.py).
        return service.distribute(dataset, config.data_service) if config.data_service \
            else dataset

    train_iterator = iter(strategy.distribute_datasets_from_function(
        train_fn, distribute.input_options(strategy))) \
        if start_step < plan.total_steps else None
    eval_datasets = {}

    def evaluate(split: str) -> dict[str, float]:
        if split not in eval_datasets:
            files = inputs.eval_splits[split]

            def eval_fn(context, files=files):
                return inputs.source.eval_dataset(files, image_size=config.image_size,
                                                  global_batch_size=plan.eval_global_batch_size,
                                                  cache=config.cache_images, context=context)
            eval_datasets[split] = strategy.distribute_datasets_from_function(eval_fn)
        eval_metrics.reset()
        steps.eval_loop(eval_datasets[split])
        return eval_metrics.results()

    # --- loop of loops -----------------------------------------------------------------------
    stop_signal = []
    previous_handlers = {sig: signal.signal(sig, lambda s, f: stop_signal.append(s))
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    eval_every = config.eval_every_steps or plan.steps_per_epoch
    # --freeze_backbone_epochs: the head alone trains for the first freeze_steps steps.
    freeze_steps = min(plan.total_steps,
                       int(round(config.freeze_backbone_epochs * plan.steps_per_epoch)))
    frozen = False
    current = start_step
    loop_rates, input_shares, first_loop_seconds = [], [], None
    overhead_seconds = 0.0  # checkpoints and summaries inside the loop
    loop_start_time = time.time()
    speed = Speedometer.measure(model, config, strategy)
    # With several replicas on one CPU the input timer also catches the other logical device's
    # work: an upper bound, shown as such (docs/benchmarks.md).
    input_bound = "<=" if plan.num_replicas > 1 and not distribute.input_options(
        strategy).experimental_fetch_to_device else ""

    def input_text(values) -> str:  # not timed with --deterministic (no timestamps in the graph)
        share = values.get("input_wait_share")
        return "" if share is None else f"input {input_bound}{share:.0%} "

    _log(f"training {config.model} on {plan.num_train_images} images, {len(inputs.class_names)} "
         f"classes, {plan.num_replicas} replica(s), global batch {plan.global_batch_size}, "
         f"{plan.total_steps} steps ({plan.steps_per_epoch} per epoch), peak lr "
         f"{plan.learning_rate:g}")
    profile = summaries.ProfileWindow(parse_profile_steps(config.profile_steps),
                                      os.path.join(config.model_dir, "train") if chief else None)
    try:
        while current < plan.total_steps:
            if (current < freeze_steps) != frozen:
                frozen = current < freeze_steps
                transfer.set_backbone_trainable(model, not frozen)
                steps.retrace()
                _log(f"backbone frozen until step {freeze_steps} (head only)" if frozen else
                     f"backbone unfrozen at step {current}")
            next_eval = (current // eval_every + 1) * eval_every
            num = min(config.steps_per_loop, plan.total_steps - current, next_eval - current)
            if frozen:
                num = min(num, freeze_steps - current)
            profile.before_loop(current + 1, current + num)
            train_metrics.reset()
            loop_start = time.time()
            step_losses, input_seconds = steps.train_loop(train_iterator,
                                                          tf.constant(num, tf.int32))
            step_losses = step_losses.numpy()
            step.assign_add(num)
            current += num
            profile.after_loop(current)
            seconds = time.time() - loop_start
            if not np.all(np.isfinite(step_losses)):
                bad = current - num + int(np.argmin(np.isfinite(step_losses)))
                raise TrainingError(f"non-finite training loss at step {bad + 1}; stopped "
                                    f"without saving (last good checkpoint: "
                                    f"{keeper.manager.latest_checkpoint or 'none'})")
            loss_log.append(current - num + 1, step_losses)
            rate = num * plan.global_batch_size / seconds
            if first_loop_seconds is None:
                first_loop_seconds = seconds  # includes tracing; not a steady-state rate
            else:
                loop_rates.append(rate)
                if steps.time_input:
                    input_shares.append(float(input_seconds) / seconds)
            values = train_metrics.results()
            del values["images"]
            values.update(learning_rate=learning_rate_of_step(plan, current),
                          images_per_second=rate,
                          step_time_ms=1000 * seconds / num,
                          mfu=rate * speed.train_flops_per_image / speed.ceiling)
            if steps.time_input:
                values["input_wait_share"] = float(input_seconds) / seconds
            if gradient_norm is not None:
                values["gradient_norm"] = float(gradient_norm.result())
                gradient_norm.reset_state()
                summaries.write_histograms(writers.train, current, model.trainable_variables)
            overhead_start = time.time()
            writers.scalars(writers.train, current, values, "train")
            remaining = (plan.total_steps - current) * plan.global_batch_size / (
                np.mean(loop_rates) if loop_rates else rate)
            _log(f"epoch {plan.epoch_of(current - 1) + 1} step {current}/{plan.total_steps} "
                 f"loss {values['loss']:.4f} acc {values['accuracy']:.4f} "
                 f"lr {values['learning_rate']:.3g} {rate:.1f} img/s "
                 f"{input_text(values)}MFU {values['mfu']:.1%} "
                 f"ETA {_format_duration(remaining)}")
            overhead_seconds += time.time() - overhead_start
            if current % eval_every == 0 and current < plan.total_steps and inputs.eval_splits:
                with ema_applied():  # --ema_decay: the averaged weights are evaluated
                    valid = evaluate("valid")
                    if chief and config.eval_figures:
                        _write_eval_figures(config, plan, inputs, model, writers, "valid",
                                            current)
                writers.scalars(writers.eval, current, valid, "valid")
                _log(f"  valid loss {valid['loss']:.4f} acc {valid['accuracy']:.4f} "
                     f"top5 {valid['top5_accuracy']:.4f}")
                best.update(current, valid["accuracy"])
                _log(f"  {best.describe()}")
            overhead_start = time.time()
            keeper.save()
            writers.flush()
            overhead_seconds += time.time() - overhead_start
            if stop_signal:
                path = keeper.save(force=True) or keeper.manager.latest_checkpoint
                _log(f"stopped by signal {stop_signal[0]} at step {current}: checkpoint {path} "
                     f"saved; run again with the same --model_dir to resume "
                     f"(exit code {EXIT_PREEMPTED})")
                raise Preempted(current)
    finally:
        profile.stop()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    # --- finish: final checkpoint, evaluation, model file, results -------------------------
    keeper.save_at_end(current)
    if frozen:  # a run that ends frozen still saves a trainable model
        transfer.set_backbone_trainable(model, True)
    results = {"steps": current, "epochs": current / plan.steps_per_epoch, "splits": {},
               "weights": f"moving average (--ema_decay={config.ema_decay:g})"
               if weight_average else "trained"}
    for split in inputs.eval_splits:
        with ema_applied():
            results["splits"][split] = evaluate(split)
            if chief and config.eval_figures:
                _write_eval_figures(config, plan, inputs, model, writers, split, current)
        writers.scalars(writers.eval, current, results["splits"][split], split)
        r = results["splits"][split]
        _log(f"final {split}: loss {r['loss']:.4f} acc {r['accuracy']:.4f} "
             f"top5 {r['top5_accuracy']:.4f} ({r['images']} images)")
    if "valid" in results["splits"]:
        best.update(current, results["splits"]["valid"]["accuracy"])
        _log(best.describe())
    results["best_checkpoint"] = best.summary()
    writers.flush()
    results.update(
        images_per_second=float(np.mean(loop_rates)) if loop_rates else None,
        mfu=float(np.mean(loop_rates)) * speed.train_flops_per_image / speed.ceiling
        if loop_rates else None,
        train_flops_per_image=speed.train_flops_per_image, ceiling_flops=speed.ceiling,
        input_wait_share=float(np.mean(input_shares)) if input_shares else None,
        checkpoint_and_summary_share=overhead_seconds / max(1e-9, time.time() - loop_start_time),
        first_loop_seconds=first_loop_seconds, wall_seconds=time.time() - run_start,
        num_replicas=plan.num_replicas, global_batch_size=plan.global_batch_size)
    if chief:
        model_path = os.path.join(config.model_dir, "model.keras")
        tmp_path = os.path.join(config.model_dir, ".model.tmp.keras")
        with ema_applied():  # --ema_decay: the file and the export hold the averaged weights
            model.save(tmp_path)
            final_weights = model.get_weights()
        os.replace(tmp_path, model_path)
        results["model_file"] = model_path
        if config.export_at_end:
            results["export_dir"] = serving.export(
                serving.inference_copy(model, config.model, len(inputs.class_names),
                                       config.image_size, weights=final_weights),
                inputs.class_names, config.image_size, os.path.join(config.model_dir, "export"),
                version=current, overwrite=True)
            _log(f"exported for serving: {results['export_dir']}")
        results_path = os.path.join(config.model_dir, "results.json")
        checkpoints.atomic_write_text(results_path, json.dumps(results, indent=2))
        _log(f"results written to {results_path}")
    return results


@dataclasses.dataclass(frozen=True)
class Speedometer:
    """What MFU is measured against: training FLOPs per image and the machine's ceiling."""
    train_flops_per_image: float
    ceiling: float

    @classmethod
    def measure(cls, model, config: Config, strategy) -> "Speedometer":
        dtype = {"none": "float32"}.get(config.mixed_precision, config.mixed_precision)
        gpus = sum(1 for d in strategy.extended.worker_devices if "GPU" in d.upper())
        return cls(performance.BACKWARD_FACTOR *
                   performance.forward_flops_per_image(model, config.image_size),
                   performance.machine_ceiling(dtype, gpus))


class StepLossLog:
    """`step<TAB>loss` per training step, appended each loop. After a resume the steps since the
    last checkpoint appear again; the last line for a step is the one that counts."""

    def __init__(self, path: str):
        self.path = path

    def append(self, first_step: int, losses: np.ndarray) -> None:
        with open(self.path, "a") as f:
            f.writelines(f"{first_step + i}\t{loss:.9g}\n" for i, loss in enumerate(losses))

    @staticmethod
    def read(path: str) -> dict[int, float]:
        with open(path) as f:
            return {int(step): float(loss) for step, loss in (line.split("\t") for line in f)}


def _write_run_description(config: Config, plan: RunPlan, inputs: Inputs, writers,
                           strategy) -> None:
    """Once per run: the resolved config (credentials left out) and the environment as text,
    the hyperparameters for the HParams dashboard, and the same training images as a grid
    before and after augmentation."""
    config_rows, plan_rows = dataclasses.asdict(config), dataclasses.asdict(plan)
    rows = summaries.public_fields(config_rows) | {f"plan.{k}": v for k, v in plan_rows.items()}
    writers.text(writers.train, 0, "config", summaries.markdown_table(rows))
    writers.text(writers.train, 0, "environment",
                 summaries.markdown_table(summaries.environment(strategy)))
    if writers.model_dir:
        summaries.write_hparams(writers.model_dir,
                                summaries.hparam_values(config_rows, plan_rows))
    for tag, augment in () if inputs.synthetic else (
            ("train/sample_images", Augment(config.crop_min_area, config.random_flip,
                                            parse_randaugment(config.randaugment))),
            ("train/sample_images_unaugmented", Augment(crop_min_area=1.0, flip=False))):
        sample = inputs.source.train_dataset(
            inputs.train, image_size=config.image_size,
            global_batch_size=min(9, len(inputs.train)), seed=config.seed, start_step=0,
            total_steps=1, cache="none", augment=augment)
        images, labels, _ = next(iter(sample))
        titles = [inputs.class_names[i] for i in labels.numpy()]
        writers.image(writers.train, 0, tag, summaries.image_grid(images.numpy(), titles))
    writers.flush()


def _write_eval_figures(config: Config, plan: RunPlan, inputs: Inputs, model, writers,
                        split: str, step: int) -> None:
    """The confusion matrix and a gallery of misclassified images of `split` at `step`
    (eval/<split>/confusion_matrix, eval/<split>/misclassified; the tags `trainer.evaluate`
    writes): one more pass over the split with the model, on the chief."""
    files = inputs.eval_splits[split]
    predictions = evaluation.predict_split(
        model, files.files, files.labels, image_size=config.image_size,
        batch_size=plan.eval_global_batch_size,
        dataset=inputs.source.eval_dataset(files, image_size=config.image_size,
                                           global_batch_size=plan.eval_global_batch_size,
                                           cache="none"))
    confusion = evaluation.confusion_matrix(predictions.labels, predictions.predicted,
                                            len(inputs.class_names))
    writers.image(writers.eval, step, f"{split}/confusion_matrix",
                  evaluation.confusion_figure(confusion, inputs.class_names))
    if len(predictions.gallery_index):
        writers.image(writers.eval, step, f"{split}/misclassified",
                      evaluation.misclassified_gallery(predictions, inputs.class_names))
