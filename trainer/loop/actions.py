"""Small actions the controller runs around each loop and evaluation (Orbit's "actions").

Hooks, each optional: `before_loop(first_step, last_step)`, `after_loop(result)`,
`after_evaluation(split, step, values, predictions)` (the evaluation's values and its
analysis.Predictions, from the same pass), `close()`. Actions that change the course of the run
(the non-finite guard, backbone freezing, the stop signal) have their own small interfaces.
"""
from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from data import decode
from models import transfer
from trainer.errors import INTERRUPTS, Interrupts, TrainingError
from trainer.loop.resume import MAX_ROLLBACKS
from trainer.loop.runner import LoopResult, StepRunner
from trainer.report import figures, summaries
from trainer.report.console import log
from trainer.loop.run_state import RunState
from trainer.tools import analysis


class _PerStepTable:
    """`step<TAB>value` per training step in a TSV file, appended after each loop. After a
    resume the steps since the last checkpoint appear again; the last line for a step counts.
    Subclasses name the LoopResult field (one value per step) and how a value is written and
    read back."""
    field = ""

    def __init__(self, path: str):
        self.path = path

    @staticmethod
    def format(value) -> str:
        raise NotImplementedError

    @staticmethod
    def parse(text: str):
        raise NotImplementedError

    def after_loop(self, result: LoopResult) -> None:
        with open(self.path, "a") as f:
            f.writelines(f"{result.first_step + i}\t{self.format(value)}\n"
                         for i, value in enumerate(getattr(result, self.field)))

    @classmethod
    def read(cls, path: str) -> dict:
        with open(path) as f:
            return {int(step): cls.parse(value)
                    for step, value in (line.rstrip("\n").split("\t") for line in f)}


class StepLossLog(_PerStepTable):
    """step_losses.tsv: each step's true mean loss over the global batch."""
    field = "step_losses"
    format = staticmethod(lambda loss: f"{loss:.9g}")
    parse = staticmethod(float)


class BatchIdsLog(_PerStepTable):
    """--debug_record_batches: batch_ids.tsv, each step's image ids (the global batch in
    replica order)."""
    field = "batch_ids"
    format = staticmethod(lambda ids: ",".join(map(str, ids)))
    parse = staticmethod(lambda text: [int(i) for i in text.split(",")])


class Histograms:
    """--summary_histograms: weight histograms and the mean global gradient norm per loop."""

    def __init__(self, state: RunState):
        self.state = state

    def after_loop(self, result: LoopResult) -> None:
        s = self.state
        s.writers.scalars(s.writers.train, result.last_step,
                          {"gradient_norm": float(s.gradient_norm.result())}, "train")
        s.gradient_norm.reset_state()
        summaries.write_histograms(s.writers.train, result.last_step, s.model.trainable_variables)


class ProfileWindow:
    """--profile_steps=A,B: a tf.profiler trace of the loops covering steps A..B (1-based),
    written to `logdir` (model_dir/train: the Profile tab)."""

    def __init__(self, steps: tuple[int, int] | None, logdir: str | None):
        self.steps, self.logdir, self.active = (steps if logdir else None), logdir, False

    def before_loop(self, first_step: int, last_step: int) -> None:
        if self.steps and not self.active and first_step <= self.steps[1] and \
                last_step >= self.steps[0]:
            tf.profiler.experimental.start(self.logdir)
            self.active = True

    def after_loop(self, result: LoopResult) -> None:
        if self.active and result.last_step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False


class EvalFigures:
    """The confusion matrix and misclassified gallery of each evaluated split (eval/<split>/...),
    on the chief, from the evaluation's own pass (its logits, labels and gallery images)."""

    def __init__(self, state: RunState):
        self.state = state

    def after_evaluation(self, split: str, step: int, values: dict,
                         predictions: analysis.Predictions) -> None:
        s = self.state
        names = s.inputs.class_names
        confusion = analysis.confusion_matrix(predictions.labels, predictions.predicted,
                                              len(names))
        s.writers.image(s.writers.eval, step, f"{split}/confusion_matrix",
                        figures.confusion_figure(confusion, names))
        if len(predictions.gallery_index):
            s.writers.image(s.writers.eval, step, f"{split}/misclassified",
                            figures.misclassified_gallery(predictions, names))


class HighLossGallery:
    """--high_loss_scan=N: at each valid evaluation, the training images with the highest loss
    (inference mode, no augmentation, the evaluation pixels of --eval_crop) in a gallery titled with label and prediction
    (train/high_loss) and a table of their paths (train/high_loss_files): likely mislabelled or
    odd images. N training images are scanned, the
    same seeded sample each time (all with N >= the training set), so galleries compare."""

    SHOWN = 12

    def __init__(self, state: RunState):
        self.state = state
        self.infer = analysis.inference_function(state.model)  # traced once per batch shape
        train = state.inputs.train
        count = min(state.config.high_loss_scan, len(train))
        chosen = np.sort(np.random.default_rng(state.config.seed).choice(
            len(train), size=count, replace=False))
        self.files = [train.files[i] for i in chosen]
        self.labels = np.asarray([train.labels[i] for i in chosen], np.int64)

    def after_evaluation(self, split: str, step: int, values: dict, evaluated) -> None:
        if split != "valid":
            return
        s = self.state
        # The evaluation pixels (--eval_crop), not training's squash: the model runs in
        # inference mode here, so its losses mean what the valid loss means, and the images
        # shown are exactly the pixels it judged.
        with s.averaged():
            predictions = analysis.predict_split(s.model, self.files, self.labels,
                                                 image_size=s.config.image_size,
                                                 batch_size=s.plan.eval_global_batch_size,
                                                 gallery_size=0, eval_crop=s.config.eval_crop,
                                                 infer=self.infer)
        losses = analysis.cross_entropy(predictions.logits, predictions.labels)
        worst = np.argsort(-losses, kind="stable")[:self.SHOWN]
        names, probabilities = s.inputs.class_names, predictions.probabilities
        images = np.stack([decode.read_for_eval(self.files[i], s.config.image_size,
                                                s.config.eval_crop).numpy() for i in worst])
        titles = [f"label: {names[self.labels[i]]}\npred: {names[predictions.predicted[i]]} "
                  f"({probabilities[i, predictions.predicted[i]]:.2f}) loss {losses[i]:.2f}"
                  for i in worst]
        s.writers.image(s.writers.train, step, "train/high_loss",
                        figures.image_grid(images, titles, columns=4))
        rows = [f"| {self.files[i]} | {names[self.labels[i]]} | {names[predictions.predicted[i]]}"
                f" | {losses[i]:.3f} |" for i in worst]  # the paths, to fix the files
        s.writers.text(s.writers.train, step, "train/high_loss_files", "\n".join(
            ["| file | label | prediction | loss |", "|---|---|---|---|"] + rows))


class TrackBest:
    """Keeps the checkpoint of the best --best_metric (checkpoints/best/); with
    --early_stopping_patience=N asks the controller to stop after N valid evaluations without
    improvement, counting only those from --early_stopping_start on (the count is in the
    checkpoint, so a restart stops where a whole run would)."""

    def __init__(self, state: RunState):
        self.state = state

    def after_evaluation(self, split: str, step: int, values: dict, evaluated) -> None:
        if split == "valid":  # a full checkpoint (with the averages under --ema_decay)
            best = self.state.best
            best.update(step, values[best.metric.split("/", 1)[1]], values["accuracy"],
                        counts=step >= early_stopping_start(self.state))
            log(f"  {best.describe()}")

    def stop_reason(self) -> str | None:
        return early_stopping_reason(self.state)


def early_stopping_start(state: RunState) -> int:
    """The first step whose valid evaluation counts against --early_stopping_patience."""
    return state.plan.early_stopping_start(state.config.early_stopping_start)


def describe_early_stopping(state: RunState) -> str:
    """The start-up line of a run with --early_stopping_patience."""
    config, start = state.config, early_stopping_start(state)
    given = config.early_stopping_start
    never = f"; the run ends at step {state.plan.total_steps} before that" \
        if start > state.plan.total_steps else ""
    return (f"early stopping after {config.early_stopping_patience} valid evaluations without a "
            f"better {config.best_metric}, counted from step {start} (--early_stopping_start="
            f"{given}{': the end of the warmup' if given.strip().lower() == 'warmup' else ''})"
            f"{never}")


def early_stopping_reason(state: RunState) -> str | None:
    """One line saying why the run stops early, or None while it goes on (never before
    --early_stopping_start, also when a resume moved it later)."""
    patience = state.config.early_stopping_patience
    since = state.best.evaluations_since_best
    start = early_stopping_start(state)
    if not patience or since < patience or state.current_step < start:
        return None
    return (f"early stopping at step {state.current_step}: {state.best.metric} has not improved "
            f"for {since} evaluations (--early_stopping_patience={patience}, counted from step "
            f"{start}); {state.best.describe()}")


class NonFiniteGuard:
    """After every loop: are the loop's losses and the weights (model and optimizer) finite?
    Weights are checked each loop, so every checkpoint saved is finite. If not: `stop` ends the
    run; `rollback` restores the latest checkpoint, skips the batches from there to the end of the
    failed loop (data position = step + skipped batches) and goes on, at most MAX_ROLLBACKS
    times. Model Garden's RecoveryAction is the model."""

    def __init__(self, state: RunState, runner: StepRunner, policy: str):
        self.state, self.runner, self.policy = state, runner, policy
        variables = [v for v in state.model.weights + state.optimizer.variables
                     if keras.backend.is_float_dtype(v.dtype)]
        self._finite = tf.function(lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(v)) for v in variables]))

    def check(self, result: LoopResult) -> bool:
        """True if the loop is good; False after a rollback (the loop is undone)."""
        losses_finite = np.isfinite(result.step_losses)
        if losses_finite.all() and bool(self._finite()):
            return True
        bad = result.first_step + int(np.argmin(losses_finite)) if not losses_finite.all() \
            else result.last_step
        what = "training loss" if not losses_finite.all() else "weights after the loop"
        s = self.state
        latest = s.keeper.manager.latest_checkpoint
        rollbacks = int(s.rollbacks.numpy())
        if self.policy == "stop" or latest is None or rollbacks >= MAX_ROLLBACKS:
            why = ("" if self.policy == "stop" else
                   "; no checkpoint to roll back to" if latest is None else
                   f"; {rollbacks} rollbacks already (--on_nan=rollback gives up after "
                   f"{MAX_ROLLBACKS})")
            raise TrainingError(f"non-finite {what} at step {bad}{why}; stopped without saving "
                                f"this loop (latest checkpoint, checked finite when saved: "
                                f"{latest or 'none'})")
        return self._roll_back(latest, result, what, bad, rollbacks)

    def _roll_back(self, latest: str, result: LoopResult, what: str, bad: int,
                   rollbacks: int) -> bool:
        s = self.state
        failed_end = s.position  # data position after the failed loop
        s.restore_latest()
        skipped = failed_end - s.current_step
        s.skipped_batches.assign(skipped)
        s.rollbacks.assign(rollbacks + 1)
        log(f"non-finite {what} at step {bad}: rolled back to {os.path.basename(latest)} (step "
            f"{s.current_step}) and skipped the batches to data position {failed_end} "
            f"(rollback {rollbacks + 1} of at most {MAX_ROLLBACKS})")
        self.runner.restart_input()
        return False


class BackboneFreeze:
    """--freeze_backbone_epochs: the head alone trains until `freeze_steps`."""

    def __init__(self, state: RunState, freeze_steps: int):
        self.state, self.freeze_steps, self.frozen = state, freeze_steps, False

    def update(self, step: int) -> None:
        if (step < self.freeze_steps) != self.frozen:
            self.frozen = step < self.freeze_steps
            transfer.set_backbone_trainable(self.state.model, not self.frozen)
            self.state.steps.retrace()
            log(f"backbone frozen until step {self.freeze_steps} (head only)" if self.frozen
                else f"backbone unfrozen at step {step}")

    def limit(self, step: int, num_steps: int) -> int:
        """A loop does not cross the unfreezing step."""
        return min(num_steps, self.freeze_steps - step) if self.frozen else num_steps

    def close(self) -> None:
        if self.frozen:  # a run that ends frozen still saves a trainable model
            transfer.set_backbone_trainable(self.state.model, True)
            self.frozen = False


class StopSignal:
    """SIGTERM/SIGINT, recorded by the process-wide handler (trainer/errors.py INTERRUPTS,
    installed by trainer.main), are read by the controller between loops (and the finishing
    phase between its outputs): from construction to `close` a first signal is deferred to
    the loop's end instead of abandoning the phase.

    With several workers the flag is agreed: each reading all-reduces it, so a signal to any
    one worker stops every worker after the same loop, where they all save the same checkpoint
    (the save is collective) and exit 75. This costs one scalar all-reduce per loop. TF's
    PreemptionCheckpointHandler does the same job but wraps every step in its own `run`, saves
    on its own schedule and ends the process itself; an agreed flag keeps the stop inside the
    controller (checkpoint, runs.jsonl, finishing) at the price of reacting at loop ends."""

    def __init__(self, strategy: tf.distribute.Strategy, num_workers: int,
                 interrupts: Interrupts = INTERRUPTS):
        # The process-wide handler (trainer/errors.py), installed by trainer.main first thing;
        # from the API (a notebook) it is installed here for the loop's duration, without the
        # second signal's forced exit (that would end the notebook's kernel).
        self.interrupts = interrupts
        self._installed_here = not interrupts.installed
        if self._installed_here:
            interrupts.install(force_second=False)
        interrupts.reassert()  # over TensorFlow's own SIGTERM handler (errors.py)
        self._deferred = interrupts.deferred()
        self._deferred.__enter__()  # from here a signal waits for the loop's end
        self._other = False  # another worker's signal (agreed through `requested`)
        self._agree = _any_worker(strategy) if num_workers > 1 else None

    @property
    def received(self) -> list[int]:
        """The signals this process received; [0] for another worker's signal."""
        return self.interrupts.received or ([0] if self._other else [])

    @property
    def requested(self) -> bool:
        """True when this process, or (with several workers) any worker, got a signal. Every
        worker must read it at the same points (it is a collective there)."""
        here = bool(self.interrupts.received)
        if self._agree is None:
            return here
        anywhere = bool(self._agree(tf.constant(1.0 if here else 0.0)))
        self._other = self._other or (anywhere and not here)
        return anywhere

    def close(self) -> None:
        if self._deferred is not None:
            self._deferred.__exit__(None, None, None)
            self._deferred = None
        if self._installed_here:
            self.interrupts.uninstall()
            self.interrupts.received.clear()  # the next api.train starts without a stop


def _any_worker(strategy: tf.distribute.Strategy):
    """A tf.function: True if `flag` (1.0 or 0.0) is 1 on any replica of any worker."""
    @tf.function
    def any_flag(flag):
        def replica_sum(value):
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(value))
        total = strategy.experimental_local_results(strategy.run(replica_sum, args=(flag,)))[0]
        return total > 0
    return any_flag
