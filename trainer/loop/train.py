"""Train (or resume) a run: set-up phases in resume order, the controller's loop, finishing.

Order of resume (each step needs the one before):
  1. strategy (logical CPU devices must exist before any op runs)
  2. the chief takes the run folder's lock (state/run_lock.py) before it writes anything; the
     newest checkpoint that reads is the resume point (state/recovery.py: newer ones that do
     not are moved aside; none that reads is a refusal, never a new run); the run's current
     config (runs.jsonl, else config.json) compared with this start's: a refused change
     stops here, before anything slow (resume.py)
  3. the --pretrained donor (new runs only), the S3 sync, the class list (classes.json when
     present) and the data check
  4. the plan: the saved plan.json continued (an accepted schedule change folded in), or a new
     one from the config, the replica count and the training set's size
  5. model, optimizer and counters in the strategy scope; the optimizer built before the first
     traced step (loop/run_state.py)
  6. restore the latest checkpoint: weights, optimizer slots, step, skipped batches, rollbacks,
     weight averages
  7. the input pipeline started at data position step + skipped batches: epoch = position //
     steps_per_epoch and the rest of that epoch skipped before decoding, so the run continues
     with the very batch it would have trained next
  8. the loop (controller.py) up to the last step, then finishing (finish.py), which a restart
     completes whenever results.json is missing
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import sys
import tempfile
import time

import keras
import tensorflow as tf

from data.augment import Augment
from data.files import atomic_write_text
from trainer.config import Config, RunPlan, epochs_to_steps, parse_profile_steps
from trainer import errors
from trainer.errors import EXIT_PEER_LOST, PeerLost, Preempted, TrainingError
from trainer.loop import (actions, distribute, finish, inputs, precision, pretrained, resume,
                          run_state)
from trainer.loop.controller import Controller
from trainer.loop.inputs import Inputs
from trainer.loop.optimization import continue_plan, learning_rate_of_step, rebatched
from trainer.loop.run_state import RunState
from trainer.loop.runner import StepRunner
from trainer.report import figures, summaries
from trainer.report.console import Reporter, log
from trainer.report.performance import Speedometer
from trainer.state import recovery, run_dir, run_lock


def run(config: Config) -> dict:
    """Train (or resume, or finish) as configured; returns the results written to results.json."""
    run_start = time.time()
    # --- 1-2. strategy; the lock; the resume point; compare with the run's config -------------
    strategy = distribute.make_strategy(config.distribution_strategy, config.cpu_devices,
                                        config.collective_timeout)
    errors.INTERRUPTS.reassert()  # TensorFlow's multi-worker runtime replaced the handler
    chief = distribute.is_chief(strategy)
    with _writer_lock(config, chief):
        return _run(config, strategy, chief, run_start)


def _writer_lock(config: Config, chief: bool):
    """The run folder's lock (state/run_lock.py), taken before anything is written into it and
    held until the end; by the chief only (other workers write into scratch folders)."""
    return run_lock.RunLock(config.model_dir, log) if chief else contextlib.nullcontext()


def _resume_point(config: Config, chief: bool) -> str | None:
    """The newest checkpoint that reads (state/recovery.py): newer ones that do not are moved
    aside by the chief, one line each; if none reads, one line and exit 1, never a new run.
    The chief checks the best checkpoint and the exports the same way."""
    try:
        checkpoint = recovery.resume_point(
            os.path.join(config.model_dir, run_dir.CHECKPOINT_DIR), move=chief, log=log)
    except recovery.NoReadableCheckpoint as e:
        raise TrainingError(str(e)) from None
    if chief:
        recovery.check_best(config.model_dir, log)
        recovery.check_exports(config.model_dir, log)
    return checkpoint


def _run(config: Config, strategy, chief: bool, run_start: float) -> dict:
    if chief:
        run_dir.mark_run(config.model_dir, [os.path.basename(sys.executable)] + sys.argv)
    checkpoint = _resume_point(config, chief)
    saved = run_dir.current_config(config.model_dir) if checkpoint else None
    accepted = _accepted_changes(config, saved)
    # --- 3. donor, data ----------------------------------------------------------------------
    donor = _load_donor(config) if config.pretrained and not checkpoint else None
    source_config = config  # config.json keeps the s3:// source, not the synced copy
    if config.data_dir and config.data_dir.startswith("s3://"):
        config = dataclasses.replace(config, data_dir=inputs.sync_from_s3(config, log))
    data = inputs.read_inputs(config, log)  # a folder, packed data or synthetic images
    if chief:  # the splits' files against those the run began with (data_fingerprint.json)
        inputs.check_data_fingerprint(config, data, checkpoint is not None, log)
    # --- 4. plan -------------------------------------------------------------------------------
    plan, batch_factor = _plan(config, strategy, data, checkpoint, accepted)
    inputs.check_plan(config, plan)
    plan = _choose_cache(config, plan, data, strategy, checkpoint)
    start = Start(source_config, saved, accepted, batch_factor, donor, run_start, checkpoint)
    # Every worker saves (collective ops), but only the chief's files are kept.
    work_dir = config.model_dir if chief else tempfile.mkdtemp(prefix="worker-")
    try:
        if chief:
            _write_run_files(source_config, plan, data, new_run=checkpoint is None)
        return _train(config, plan, data, strategy, chief, work_dir, start)
    finally:
        if not chief:
            shutil.rmtree(work_dir, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Start:
    """What the set-up found out about this start, for the phases after it."""
    source_config: Config  # as given (an s3:// --data_dir, not the synced copy)
    saved: dict | None  # the run's current config before this start (None: a new run)
    accepted: list[str]  # flags accepted as changed (--allow_change)
    batch_factor: float  # old / new global batch after an accepted batch change, else 1
    donor: object  # the --pretrained donor of a new run, or None
    time: float
    checkpoint: str | None = None  # the newest checkpoint that reads (None: a new run)


def _train(config: Config, plan: RunPlan, data: Inputs, strategy, chief: bool, work_dir: str,
           start: Start) -> dict:
    # --- 5-6. model, optimizer, counters; restore ------------------------------------------------
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    config = precision.apply_global_policy(config, log)  # --mixed_precision=auto resolved
    state = run_state.create(config, plan, data, strategy, chief, work_dir, start.donor, log)
    restored = state.keeper.restore(start.checkpoint)
    if restored and start.batch_factor != 1:
        _rebatch_counters(state, start.batch_factor)
    start_step = state.current_step
    if restored:
        log(f"resumed from {restored} at step {start_step} (epoch {plan.epoch_of(start_step) + 1}"
            f", batch {start_step % plan.steps_per_epoch} of the epoch)")
        for name in start.accepted:
            if name not in resume.SCHEDULE_FLAGS:
                log(resume.describe(name, start.saved, config))
    stopping = early_stopping_context(state)
    stopped_early = actions.early_stopping_reason(stopping)
    if start_step >= plan.total_steps or stopped_early:
        results = finish.finished_results(config.model_dir, start_step)
        if results is not None:
            log(f"the run in {config.model_dir} is finished ({start_step} of {plan.total_steps} "
                f"steps{', stopped early' if stopped_early else ''}); results: "
                f"{os.path.join(config.model_dir, run_dir.RESULTS_FILE)}. Pass a larger "
                + ("--early_stopping_patience" if stopped_early else
                   "--train_steps or --epochs with --allow_change") + " to train on.")
            return results
        log(f"the run {'stopped early' if stopped_early else 'reached its last step'} (step "
            f"{start_step}); finishing: final evaluation, model file, export, results")
    runs = run_dir.RunsLog(config.model_dir) if chief else None
    if runs:
        runs.start(dataclasses.asdict(start.source_config), start_step, summaries.git_commit())
    if start_step == 0:
        _write_run_description(config, plan, data, state)
    controller = _controller(state, stopping)
    reason = "error"
    try:
        # --- 7-8. the loop, then finishing -------------------------------------------------------
        controller.train()
        results = finish.finish(controller, start.time)
        reason = "finished"
        return results
    except Preempted:
        reason = "preempted"
        raise
    except tf.errors.OpError as e:
        # With several workers only an error that says a peer is gone is a lost peer; a real
        # error of this worker (a full disk, a bad image) is reported as itself.
        if distribute.num_workers(strategy) == 1 or not errors.is_peer_lost(e):
            raise
        reason = "peer lost"
        raise _peer_lost(e, strategy, controller.last_step, config) from None
    finally:
        controller.close()
        if runs:
            runs.end(state.current_step, reason)


def _controller(state: RunState, stopping: actions.EarlyStopping) -> Controller:
    """The controller with its runner, reporter and actions for this run's flags, each action
    given only the parts of the state it uses."""
    config, plan = state.config, state.plan
    runner = StepRunner(state)
    if runner.watch:  # --data_service: what a lost worker does to the run
        log(runner.watch.describe())
    speed = Speedometer.measure(state.model, config.image_size, config.mixed_precision,
                                state.strategy)
    reporter = Reporter(plan, state.writers, speed, input_is_upper_bound=plan.num_replicas > 1
                        and not distribute.input_options(state.strategy)
                        .experimental_fetch_to_device,
                        learning_rate=functools.partial(learning_rate_of_step, plan))
    freeze_steps = min(plan.total_steps,
                       epochs_to_steps(config.freeze_backbone_epochs, plan.steps_per_epoch))
    extras = [actions.StepLossLog(os.path.join(state.work_dir, "step_losses.tsv")),
              actions.ProfileWindow(parse_profile_steps(config.profile_steps),
                                    os.path.join(config.model_dir, "train")
                                    if state.chief else None),
              actions.TrackBest(stopping)]
    if state.gradient_norm is not None:
        extras.append(actions.Histograms(state.writers, state.gradient_norm, state.model))
    if state.steps.record_ids:
        extras.append(actions.BatchIdsLog(os.path.join(state.work_dir, "batch_ids.tsv")))
    if state.chief and config.eval_figures:
        extras.append(actions.EvalFigures(state.writers, state.inputs.class_names))
    # Image folders only: packed data has no files to show or fix.
    if state.chief and config.high_loss_scan and not state.inputs.synthetic and \
            getattr(state.inputs.source, "kind", "") == "folder":
        extras.append(actions.HighLossGallery(high_loss_context(state)))
    log(f"training {config.model} on {plan.num_train_images} images, "
        f"{len(state.inputs.class_names)} classes, {plan.num_replicas} replica(s), global batch "
        f"{plan.global_batch_size}, {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), "
        f"peak lr {plan.learning_rate:g}")
    if config.early_stopping_patience:
        log(actions.describe_early_stopping(stopping, config.early_stopping_start,
                                            plan.total_steps))
    course = [actions.NonFiniteGuard(non_finite_context(state, runner), config.on_nan),
              actions.BackboneFreeze(state.model, state.steps.retrace, freeze_steps),
              actions.StopSignal(state.strategy, distribute.num_workers(state.strategy))]
    return Controller(state, runner, reporter, course + extras)


def early_stopping_context(state: RunState) -> actions.EarlyStopping:
    """TrackBest's and the early-stopping lines' part of the state."""
    return actions.EarlyStopping(
        best=state.best, patience=state.config.early_stopping_patience,
        start=state.plan.early_stopping_start(state.config.early_stopping_start),
        current_step=lambda: state.current_step)


def high_loss_context(state: RunState) -> actions.HighLossContext:
    """HighLossGallery's part of the state, with the --high_loss_scan sample drawn."""
    config = state.config
    files, labels = actions.high_loss_sample(state.inputs.train, config.high_loss_scan,
                                             config.seed)
    return actions.HighLossContext(
        model=state.model, averaged=state.averaged, files=files, labels=labels,
        class_names=state.inputs.class_names, image_size=config.image_size,
        eval_crop=config.eval_crop, batch_size=state.plan.eval_global_batch_size,
        writers=state.writers)


def non_finite_context(state: RunState, runner: StepRunner) -> actions.NonFiniteContext:
    """NonFiniteGuard's part of the state and the runner's input restart."""
    return actions.NonFiniteContext(
        weights=state.model.weights + state.optimizer.variables, keeper=state.keeper,
        step=state.step, skipped_batches=state.skipped_batches, rollbacks=state.rollbacks,
        restore_latest=state.restore_latest, position=lambda: state.position,
        restart_input=runner.restart_input)


# ============================================================================================
# Set-up helpers
# ============================================================================================
def _peer_lost(error: tf.errors.OpError, strategy, step: int, config: Config) -> PeerLost:
    """One line naming the lost peer (from the error's task names) and the last step done."""
    resolver = strategy.cluster_resolver
    me = (resolver.task_type, str(resolver.task_id))
    tasks = [t for t in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", str(error))
             if t != me]
    # A collective that timed out (a frozen peer) may name no task; with one other task in the
    # cluster it can only be that one.
    others = [(job, str(i)) for job, addresses in resolver.cluster_spec().as_dict().items()
              for i in range(len(addresses)) if (job, str(i)) != me]
    named = tasks[0] if tasks else others[0] if len(others) == 1 else None
    peer = f"{named[0]}:{named[1]} ({distribute.task_address(strategy, ':'.join(named))})" \
        if named else f"a peer (one of {', '.join(':'.join(t) for t in others)})"
    text = re.sub(r"\{\{.*?\}\}\s*", "", str(error)).strip()
    cause = text.splitlines()[0][:160] if text else "no detail"
    return PeerLost(f"lost contact with {peer} after "
                    f"step {step} ({type(error).__name__}: {cause}); checkpoints are kept: "
                    f"restart every worker to resume (exit code {EXIT_PEER_LOST}; "
                    f"--collective_timeout={config.collective_timeout:g} s bounds the wait)")


def _accepted_changes(config: Config, saved: dict | None) -> list[str]:
    if saved is None:
        return []
    allowed = [name for name in config.allow_change.split(",") if name]
    try:
        return resume.check_config(saved, config, allowed, config.model_dir)
    except resume.ResumeError as e:
        raise TrainingError(str(e)) from None


def _load_donor(config: Config):
    """The --pretrained donor, loaded before the data check so that a bad source (or no network
    for imagenet) stops the run at once."""
    try:
        return pretrained.load_donor(config)
    except pretrained.PretrainedError as e:
        raise TrainingError(str(e)) from None


def _plan(config: Config, strategy, data: Inputs, checkpoint: str | None,
          accepted: list[str]) -> tuple[RunPlan, float]:
    """The plan, and old / new global batch (1 unless an accepted batch change)."""
    fresh = RunPlan.make(config, strategy.num_replicas_in_sync, data.num_train_images)
    plan_path = os.path.join(config.model_dir, run_dir.PLAN_FILE)
    if checkpoint is None or not os.path.exists(plan_path):
        return fresh, 1.0
    saved = RunPlan.from_dict(run_dir.read_json(plan_path))
    factor = saved.global_batch_size / fresh.global_batch_size
    step = round(run_dir.SavedRun.checkpoint_step(checkpoint) * factor)
    try:
        allowed = config.allow_change.split(",")
        plan, line = continue_plan(rebatched(saved, fresh, allowed), fresh, step, accepted)
    except resume.ResumeError as e:
        raise TrainingError(str(e)) from None
    if line:
        log(line)
    if saved.precision and saved.precision.startswith("float16") != \
            fresh.precision.startswith("float16"):  # e.g. --mixed_precision=auto elsewhere
        raise TrainingError(f"--mixed_precision={config.mixed_precision} means "
                            f"{fresh.precision.split(' (')[0]} here, but the run trained in "
                            f"{saved.precision.split(' (')[0]}: float16's loss-scale state is in "
                            f"the checkpoint or not; pass another --mixed_precision, or use a new "
                            f"--model_dir")
    plan = dataclasses.replace(plan, precision=fresh.precision)
    if fresh.num_train_images != saved.num_train_images:
        log(f"warning: the training set now has {fresh.num_train_images} images (the run was "
            f"planned with {saved.num_train_images}): epochs have other batches than before")
    return plan, factor


def _choose_cache(config: Config, plan: RunPlan, data: Inputs, strategy,
                  checkpoint: str | None) -> RunPlan:
    """--cache_images for this start, before anything is decoded; kept in plan.json. A resume
    whose choice differs from the last start's says what that does to the data order."""
    choice = inputs.choose_cache(config, data, distribute.num_workers(strategy),
                                 distribute.input_pipeline_id(strategy))
    log(choice.line)
    plan_path = os.path.join(config.model_dir, run_dir.PLAN_FILE)
    before = run_dir.read_json(plan_path).get("cache_images", "") \
        if checkpoint and os.path.exists(plan_path) else ""
    if before and before != choice.train:
        log(resume.describe_cache_change(before, choice.train))
    return dataclasses.replace(plan, cache_images=choice.train, eval_cache=choice.eval,
                               cache=choice.line)


def _rebatch_counters(state: RunState, factor: float) -> None:
    """After an accepted global batch change: the restored step and skipped batches, counted
    in batches of the old size, become the same number of images in batches of the new."""
    old_step, old_skipped = state.current_step, int(state.skipped_batches.numpy())
    state.step.assign(round(old_step * factor))
    state.skipped_batches.assign(round(old_skipped * factor))
    old_batch = round(state.plan.global_batch_size * factor)
    log(f"global batch changed from {old_batch} to {state.plan.global_batch_size} "
        f"(--allow_change): step {old_step} ({(old_step + old_skipped) * old_batch} images "
        f"seen) continues as step {state.current_step}; the epoch position and the schedule "
        f"are counted in images (the run ends at step {state.plan.total_steps})")


def _write_run_files(config: Config, plan: RunPlan, data: Inputs, new_run: bool) -> None:
    """classes.json, plan.json, and config.json for a new run (it keeps the first config)."""
    model_dir = config.model_dir
    os.makedirs(model_dir, exist_ok=True)
    run_dir.write_json(os.path.join(model_dir, run_dir.CLASSES_FILE), data.class_names)
    run_dir.write_json(os.path.join(model_dir, run_dir.PLAN_FILE), dataclasses.asdict(plan))
    if new_run or not os.path.exists(os.path.join(model_dir, run_dir.CONFIG_FILE)):
        atomic_write_text(os.path.join(model_dir, run_dir.CONFIG_FILE), config.to_json())


def _write_run_description(config: Config, plan: RunPlan, data: Inputs,
                           state: RunState) -> None:
    """Once per run: the resolved config (credentials left out) and the environment as text,
    the hyperparameters for the HParams dashboard, and (--sample_images) the same training
    images as a grid before and after augmentation."""
    writers = state.writers
    config_rows, plan_rows = dataclasses.asdict(config), dataclasses.asdict(plan)
    rows = summaries.public_fields(config_rows) | {f"plan.{k}": v for k, v in plan_rows.items()}
    writers.text(writers.train, 0, "config", summaries.markdown_table(rows))
    writers.text(writers.train, 0, "environment",
                 summaries.markdown_table(summaries.environment(
                     state.strategy, distribute.num_workers(state.strategy),
                     precision.detect_hardware().describe())))
    if writers.model_dir:
        summaries.write_hparams(writers.model_dir,
                                summaries.hparam_values(config_rows, plan_rows))
    if config.sample_images and not data.synthetic:
        for tag, augment in (("train/sample_images", inputs.train_augment(config)),
                             ("train/sample_images_unaugmented",
                              Augment(crop_min_area=1.0, flip=False))):
            images, titles = inputs.sample_images(config, data, augment)
            writers.image(writers.train, 0, tag, figures.image_grid(images, titles))
    writers.flush()
