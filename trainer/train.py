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

from data import layout, pipeline
from models import registry
from trainer import checkpoints, distribute, summaries
from trainer.config import Config, RunPlan
from trainer.optimization import current_learning_rate, make_optimizer
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


def _log(message: str) -> None:
    print(message, flush=True)


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ============================================================================================
# Data layout and the saved run description
# ============================================================================================
def read_inputs(config: Config) -> Inputs:
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
    train = layout.scan_split(config.data_dir, "train", class_names)
    eval_splits = {}
    for split in ("valid", "test"):
        if os.path.isdir(os.path.join(config.data_dir, split)):
            eval_splits[split] = layout.scan_split(config.data_dir, split, class_names,
                                                   config.skip_unknown_classes)
            for folder, train_name in eval_splits[split].renamed:
                _log(f"warning: {split} class folder {folder!r} taken as train class "
                     f"{train_name!r} (they differ only by whitespace or case)")
    if "valid" not in eval_splits:
        raise TrainingError(f"{config.data_dir!r} has no valid/ split")
    return Inputs(class_names, train, eval_splits)


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


def check_plan(config: Config, plan: RunPlan) -> None:
    for name, batch in (("--batch_size", plan.global_batch_size),
                        ("--eval_batch_size", plan.eval_global_batch_size)):
        if batch % plan.num_replicas:
            raise TrainingError(f"{name}: global batch {batch} does not divide by "
                                f"{plan.num_replicas} replicas")
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
    inputs = read_inputs(config)
    plan = RunPlan.make(config, strategy.num_replicas_in_sync, len(inputs.train))
    check_plan(config, plan)
    if chief:
        os.makedirs(config.model_dir, exist_ok=True)
        checkpoints.atomic_write_text(os.path.join(config.model_dir, "classes.json"),
                                      json.dumps(inputs.class_names, indent=1))
        checkpoints.atomic_write_text(os.path.join(config.model_dir, "config.json"),
                                      config.to_json())
        checkpoints.atomic_write_text(os.path.join(config.model_dir, "plan.json"),
                                      json.dumps(dataclasses.asdict(plan), indent=2))
    try:
        return _train(config, plan, inputs, strategy, chief, work_dir)
    finally:
        if not chief:
            shutil.rmtree(work_dir, ignore_errors=True)


def _train(config: Config, plan: RunPlan, inputs: Inputs, strategy, chief: bool,
           work_dir: str) -> dict:
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
        optimizer = make_optimizer(config, plan)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        train_metrics, eval_metrics = Metrics.create("train"), Metrics.create("eval")
    steps = StepFunctions(strategy, model, optimizer, global_batch_size=plan.global_batch_size,
                          train_metrics=train_metrics, eval_metrics=eval_metrics, xla=config.xla,
                          clip_grad_norm=config.clip_grad_norm)

    # --- restore -----------------------------------------------------------------------------
    keeper = checkpoints.CheckpointKeeper(
        os.path.join(work_dir, "checkpoints"), model=model, optimizer=optimizer, step=step,
        max_to_keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps)
    restored = keeper.restore_latest(os.path.join(config.model_dir, "checkpoints"))
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
        _write_run_description(config, plan, inputs, writers)

    # --- inputs from the restored position ---------------------------------------------------
    def train_fn(context):
        return pipeline.train_dataset(
            inputs.train.files, inputs.train.labels, image_size=config.image_size,
            global_batch_size=plan.global_batch_size, seed=config.seed, start_step=start_step,
            total_steps=plan.total_steps, cache=config.cache_images, context=context,
            augment=pipeline.Augment(config.crop_min_area, config.random_flip))

    train_iterator = iter(strategy.distribute_datasets_from_function(train_fn)) \
        if start_step < plan.total_steps else None
    eval_datasets = {}

    def evaluate(split: str) -> dict[str, float]:
        if split not in eval_datasets:
            files = inputs.eval_splits[split]

            def eval_fn(context, files=files):
                return pipeline.eval_dataset(files.files, files.labels,
                                             image_size=config.image_size,
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
    current = start_step
    loop_rates, first_loop_seconds = [], None
    _log(f"training {config.model} on {plan.num_train_images} images, {len(inputs.class_names)} "
         f"classes, {plan.num_replicas} replica(s), global batch {plan.global_batch_size}, "
         f"{plan.total_steps} steps ({plan.steps_per_epoch} per epoch), peak lr "
         f"{plan.learning_rate:g}")
    try:
        while current < plan.total_steps:
            next_eval = (current // eval_every + 1) * eval_every
            num = min(config.steps_per_loop, plan.total_steps - current, next_eval - current)
            train_metrics.reset()
            loop_start = time.time()
            step_losses = steps.train_loop(train_iterator, tf.constant(num, tf.int32)).numpy()
            step.assign_add(num)
            current += num
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
            values = train_metrics.results()
            del values["images"]
            values.update(learning_rate=current_learning_rate(optimizer), images_per_second=rate,
                          step_time_ms=1000 * seconds / num)
            writers.scalars(writers.train, current, values, "train")
            remaining = (plan.total_steps - current) * plan.global_batch_size / (
                np.mean(loop_rates) if loop_rates else rate)
            _log(f"epoch {plan.epoch_of(current - 1) + 1} step {current}/{plan.total_steps} "
                 f"loss {values['loss']:.4f} acc {values['accuracy']:.4f} "
                 f"lr {values['learning_rate']:.3g} {rate:.1f} img/s "
                 f"ETA {_format_duration(remaining)}")
            if current % eval_every == 0 and current < plan.total_steps:
                valid = evaluate("valid")
                writers.scalars(writers.eval, current, valid, "valid")
                _log(f"  valid loss {valid['loss']:.4f} acc {valid['accuracy']:.4f} "
                     f"top5 {valid['top5_accuracy']:.4f}")
            keeper.save()
            writers.flush()
            if stop_signal:
                path = keeper.save(force=True) or keeper.manager.latest_checkpoint
                _log(f"stopped by signal {stop_signal[0]} at step {current}: checkpoint {path} "
                     f"saved; run again with the same --model_dir to resume "
                     f"(exit code {EXIT_PREEMPTED})")
                raise Preempted(current)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    # --- finish: final checkpoint, evaluation, model file, results -------------------------
    keeper.save_at_end(current)
    results = {"steps": current, "epochs": current / plan.steps_per_epoch, "splits": {}}
    for split in inputs.eval_splits:
        results["splits"][split] = evaluate(split)
        writers.scalars(writers.eval, current, results["splits"][split], split)
        r = results["splits"][split]
        _log(f"final {split}: loss {r['loss']:.4f} acc {r['accuracy']:.4f} "
             f"top5 {r['top5_accuracy']:.4f} ({r['images']} images)")
    writers.flush()
    results.update(
        images_per_second=float(np.mean(loop_rates)) if loop_rates else None,
        first_loop_seconds=first_loop_seconds, wall_seconds=time.time() - run_start,
        num_replicas=plan.num_replicas, global_batch_size=plan.global_batch_size)
    if chief:
        model_path = os.path.join(config.model_dir, "model.keras")
        tmp_path = os.path.join(config.model_dir, ".model.tmp.keras")
        model.save(tmp_path)
        os.replace(tmp_path, model_path)
        results["model_file"] = model_path
        results_path = os.path.join(config.model_dir, "results.json")
        checkpoints.atomic_write_text(results_path, json.dumps(results, indent=2))
        _log(f"results written to {results_path}")
    return results


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


def _write_run_description(config: Config, plan: RunPlan, inputs: Inputs, writers) -> None:
    """Once per run: the resolved config as text and a grid of augmented training images."""
    rows = dataclasses.asdict(config) | {f"plan.{k}": v for k, v in dataclasses.asdict(plan).items()}
    writers.text(writers.train, 0, "config", summaries.markdown_table(rows))
    sample = pipeline.train_dataset(
        inputs.train.files, inputs.train.labels, image_size=config.image_size,
        global_batch_size=min(9, len(inputs.train)), seed=config.seed, start_step=0,
        total_steps=1, cache=False, augment=pipeline.Augment(config.crop_min_area,
                                                             config.random_flip))
    images, labels, _ = next(iter(sample))
    titles = [inputs.class_names[i] for i in labels.numpy()]
    writers.image(writers.train, 0, "train/sample_images",
                  summaries.image_grid(images.numpy(), titles))
    writers.flush()
