"""Small actions the controller runs around each loop and evaluation (Orbit's "actions").

Every action is an `Action`: the base class has a no-op method for each hook the controller
calls (HOOKS, in the order of a loop), and a subclass overrides the ones it needs. A public
method that is not a hook (a misspelt `after_evaluaton`) is a TypeError when the class is
defined, so a hook can never silently not run. The actions that change the course of the run
are ordinary actions too: the non-finite guard (`accept`), backbone freezing (`at_loop_start`,
`limit`, `before_finish`), the stop signal (`stop_requested`), early stopping (`stop_reason`).

An action is given only what it uses (plain values, or a small frozen context declared next to
it), never the whole RunState: each is built and tested on its own (tests/test_actions.py);
trainer/loop/train.py builds them from the run's state.
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Callable, ContextManager

import keras
import numpy as np
import tensorflow as tf

from data import decode, layout
from models import transfer
from trainer.errors import INTERRUPTS, Interrupts, TrainingError
from trainer.loop.resume import MAX_ROLLBACKS
from trainer.loop.runner import LoopResult
from trainer.report import figures, summaries
from trainer.report.console import log
from trainer.state import checkpoints
from trainer.tools import analysis


class Action:
    """The hooks, in the order the controller calls them in a loop; each a no-op here."""

    def stop_reason(self) -> str | None:
        """A line saying why the run should stop now (early stopping), or None."""
        return None

    def at_loop_start(self, step: int) -> None:
        """Before the next loop's length is decided; `step` steps are done."""

    def limit(self, step: int, num_steps: int) -> int:
        """The next loop's length, at most `num_steps` (a loop may not cross a boundary)."""
        return num_steps

    def before_loop(self, first_step: int, last_step: int) -> None:
        """The loop about to run steps first_step..last_step (1-based)."""

    def accept(self, result: LoopResult) -> bool:
        """False if the loop was undone (a rollback): the controller starts the next one."""
        return True

    def after_loop(self, result: LoopResult) -> None:
        """The loop's result, once accepted."""

    def after_evaluation(self, split: str, step: int, values: dict, predictions) -> None:
        """An evaluation's values and its analysis.Predictions, from the same pass."""

    def stop_requested(self, here_only: bool) -> str | None:
        """Who asked the run to stop ("signal 15"), or None. Every worker calls it at the same
        points (with several workers it may be a collective), unless `here_only`."""
        return None

    def before_finish(self) -> None:
        """The loop is over; the final checkpoint is saved and the outputs come next."""

    def close(self) -> None:
        """The run ends (finished, stopped or failed)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if isinstance(value, types.FunctionType) and not name.startswith("_") \
                    and name not in HOOKS:
                raise TypeError(f"{cls.__name__}.{name} is not an action hook (hooks: "
                                f"{', '.join(HOOKS)}); name a helper method _{name}")


HOOKS = tuple(name for name in vars(Action) if not name.startswith("_"))


class _PerStepTable(Action):
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


class Histograms(Action):
    """--summary_histograms: weight histograms and the mean global gradient norm per loop."""

    def __init__(self, writers: summaries.Summaries, gradient_norm: keras.metrics.Mean,
                 model: keras.Model):
        # The model, not its variables: freezing the backbone changes which are trainable.
        self.writers, self.gradient_norm, self.model = writers, gradient_norm, model

    def after_loop(self, result: LoopResult) -> None:
        writers = self.writers
        writers.scalars(writers.train, result.last_step,
                        {"gradient_norm": float(self.gradient_norm.result())}, "train")
        self.gradient_norm.reset_state()
        summaries.write_histograms(writers.train, result.last_step,
                                   self.model.trainable_variables)


class ProfileWindow(Action):
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


class EvalFigures(Action):
    """The confusion matrix and misclassified gallery of each evaluated split (eval/<split>/...),
    on the chief, from the evaluation's own pass (its logits, labels and gallery images)."""

    def __init__(self, writers: summaries.Summaries, class_names: list[str]):
        self.writers, self.class_names = writers, class_names

    def after_evaluation(self, split: str, step: int, values: dict,
                         predictions: analysis.Predictions) -> None:
        writers, names = self.writers, self.class_names
        confusion = analysis.confusion_matrix(predictions.labels, predictions.predicted,
                                              len(names))
        writers.image(writers.eval, step, f"{split}/confusion_matrix",
                      figures.confusion_figure(confusion, names))
        if len(predictions.gallery_index):
            writers.image(writers.eval, step, f"{split}/misclassified",
                          figures.misclassified_gallery(predictions, names))


def high_loss_sample(train: layout.SplitFiles, count: int,
                     seed: int) -> tuple[list[str], np.ndarray]:
    """--high_loss_scan=N: the files and labels of N training images (all with N >= the
    training set), the same seeded sample at every evaluation so that galleries compare."""
    count = min(count, len(train))
    chosen = np.sort(np.random.default_rng(seed).choice(len(train), size=count, replace=False))
    return [train.files[i] for i in chosen], np.asarray([train.labels[i] for i in chosen],
                                                        np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class HighLossContext:
    """What HighLossGallery reads: the model and how to put the evaluated weights in it, the
    scanned images (high_loss_sample), and how the evaluation reads and batches them."""
    model: keras.Model
    averaged: Callable[[], ContextManager]  # RunState.averaged: the --ema_decay averages
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    image_size: int
    eval_crop: float
    batch_size: int  # the evaluation's global batch
    writers: summaries.Summaries


class HighLossGallery(Action):
    """--high_loss_scan=N: at each valid evaluation, the training images with the highest loss
    (inference mode, no augmentation, the evaluation pixels of --eval_crop) in a gallery titled
    with label and prediction (train/high_loss) and a table of their paths
    (train/high_loss_files): likely mislabelled or odd images, among the images of
    `context.files` (high_loss_sample)."""

    SHOWN = 12

    def __init__(self, context: HighLossContext):
        self.context = context
        self.infer = analysis.inference_function(context.model)  # traced once per batch shape

    def after_evaluation(self, split: str, step: int, values: dict, evaluated) -> None:
        if split != "valid":
            return
        c = self.context
        # The evaluation pixels (--eval_crop), not training's squash: the model runs in
        # inference mode here, so its losses mean what the valid loss means, and the images
        # shown are exactly the pixels it judged.
        with c.averaged():
            predictions = analysis.predict_split(c.model, c.files, c.labels,
                                                 image_size=c.image_size,
                                                 batch_size=c.batch_size, gallery_size=0,
                                                 eval_crop=c.eval_crop, infer=self.infer)
        losses = analysis.cross_entropy(predictions.logits, predictions.labels)
        worst = np.argsort(-losses, kind="stable")[:self.SHOWN]
        names, probabilities = c.class_names, predictions.probabilities
        images = np.stack([decode.read_for_eval(c.files[i], c.image_size,
                                                c.eval_crop).numpy() for i in worst])
        titles = [f"label: {names[c.labels[i]]}\npred: {names[predictions.predicted[i]]} "
                  f"({probabilities[i, predictions.predicted[i]]:.2f}) loss {losses[i]:.2f}"
                  for i in worst]
        c.writers.image(c.writers.train, step, "train/high_loss",
                        figures.image_grid(images, titles, columns=4))
        rows = [f"| {c.files[i]} | {names[c.labels[i]]} | {names[predictions.predicted[i]]}"
                f" | {losses[i]:.3f} |" for i in worst]  # the paths, to fix the files
        c.writers.text(c.writers.train, step, "train/high_loss_files", "\n".join(
            ["| file | label | prediction | loss |", "|---|---|---|---|"] + rows))


@dataclasses.dataclass(frozen=True, eq=False)
class EarlyStopping:
    """What TrackBest and the early-stopping lines read: the best checkpoint (its record counts
    the valid evaluations since the best), --early_stopping_patience (0: never stop early), the
    first step whose valid evaluation counts (--early_stopping_start resolved by the plan), and
    the steps done so far."""
    best: checkpoints.BestCheckpoint
    patience: int
    start: int
    current_step: Callable[[], int]


class TrackBest(Action):
    """Keeps the checkpoint of the best --best_metric (checkpoints/best/); with
    --early_stopping_patience=N asks the controller to stop after N valid evaluations without
    improvement, counting only those from --early_stopping_start on (the count is in the
    checkpoint, so a restart stops where a whole run would)."""

    def __init__(self, stopping: EarlyStopping):
        self.stopping = stopping

    def after_evaluation(self, split: str, step: int, values: dict, evaluated) -> None:
        if split == "valid":  # a full checkpoint (with the averages under --ema_decay)
            best = self.stopping.best
            best.update(step, values[best.metric.split("/", 1)[1]], values["accuracy"],
                        counts=step >= self.stopping.start)
            log(f"  {best.describe()}")

    def stop_reason(self) -> str | None:
        return early_stopping_reason(self.stopping)


def describe_early_stopping(stopping: EarlyStopping, start_flag: str, total_steps: int) -> str:
    """The start-up line of a run with --early_stopping_patience (`start_flag`: the text of
    --early_stopping_start)."""
    start = stopping.start
    never = f"; the run ends at step {total_steps} before that" if start > total_steps else ""
    warmup = ': the end of the warmup' if start_flag.strip().lower() == 'warmup' else ''
    return (f"early stopping after {stopping.patience} valid evaluations without a better "
            f"{stopping.best.metric}, counted from step {start} (--early_stopping_start="
            f"{start_flag}{warmup}){never}")


def early_stopping_reason(stopping: EarlyStopping) -> str | None:
    """One line saying why the run stops early, or None while it goes on (never before
    --early_stopping_start, also when a resume moved it later)."""
    patience, best, start = stopping.patience, stopping.best, stopping.start
    since, step = best.evaluations_since_best, stopping.current_step()
    if not patience or since < patience or step < start:
        return None
    return (f"early stopping at step {step}: {best.metric} has not improved "
            f"for {since} evaluations (--early_stopping_patience={patience}, counted from step "
            f"{start}); {best.describe()}")


@dataclasses.dataclass(frozen=True, eq=False)
class NonFiniteContext:
    """What NonFiniteGuard checks and, to roll back, reads and changes: the weights (model and
    optimizer), the keeper (its latest checkpoint), the run's counters, and the run's restore,
    data position and input restart."""
    weights: list  # model.weights + optimizer.variables; the non-float ones are left out
    keeper: checkpoints.CheckpointKeeper
    step: tf.Variable
    skipped_batches: tf.Variable
    rollbacks: tf.Variable
    restore_latest: Callable[[], str | None]  # RunState.restore_latest
    position: Callable[[], int]  # the data position of the next step (RunState.position)
    restart_input: Callable[[], None]  # StepRunner.restart_input: the input at that position


class NonFiniteGuard(Action):
    """After every loop: are the loop's losses and the weights (model and optimizer) finite?
    Weights are checked each loop, so every checkpoint saved is finite. If not: `stop` ends the
    run; `rollback` restores the latest checkpoint, skips the batches from there to the end of the
    failed loop (data position = step + skipped batches) and goes on, at most MAX_ROLLBACKS
    times. Model Garden's RecoveryAction is the model."""

    def __init__(self, context: NonFiniteContext, policy: str):
        self.context, self.policy = context, policy
        variables = [v for v in context.weights if keras.backend.is_float_dtype(v.dtype)]
        self._finite = tf.function(lambda: tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(v)) for v in variables]))

    def accept(self, result: LoopResult) -> bool:
        """True if the loop is good; False after a rollback (the loop is undone)."""
        losses_finite = np.isfinite(result.step_losses)
        if losses_finite.all() and bool(self._finite()):
            return True
        bad = result.first_step + int(np.argmin(losses_finite)) if not losses_finite.all() \
            else result.last_step
        what = "training loss" if not losses_finite.all() else "weights after the loop"
        latest = self.context.keeper.manager.latest_checkpoint
        rollbacks = int(self.context.rollbacks.numpy())
        if self.policy == "stop" or latest is None or rollbacks >= MAX_ROLLBACKS:
            why = ("" if self.policy == "stop" else
                   "; no checkpoint to roll back to" if latest is None else
                   f"; {rollbacks} rollbacks already (--on_nan=rollback gives up after "
                   f"{MAX_ROLLBACKS})")
            raise TrainingError(f"non-finite {what} at step {bad}{why}; stopped without saving "
                                f"this loop (latest checkpoint, checked finite when saved: "
                                f"{latest or 'none'})")
        return self._roll_back(latest, what, bad, rollbacks)

    def _roll_back(self, latest: str, what: str, bad: int, rollbacks: int) -> bool:
        c = self.context
        failed_end = c.position()  # data position after the failed loop
        c.restore_latest()
        step = int(c.step.numpy())
        c.skipped_batches.assign(failed_end - step)
        c.rollbacks.assign(rollbacks + 1)
        log(f"non-finite {what} at step {bad}: rolled back to {os.path.basename(latest)} (step "
            f"{step}) and skipped the batches to data position {failed_end} "
            f"(rollback {rollbacks + 1} of at most {MAX_ROLLBACKS})")
        c.restart_input()
        return False


class BackboneFreeze(Action):
    """--freeze_backbone_epochs: the head alone trains until `freeze_steps`. `retrace`: the
    step functions' (StepFunctions.retrace), which read the trainable layers when traced."""

    def __init__(self, model: keras.Model, retrace: Callable[[], None], freeze_steps: int):
        self.model, self.retrace, self.freeze_steps = model, retrace, freeze_steps
        self.frozen = False

    def at_loop_start(self, step: int) -> None:
        if (step < self.freeze_steps) != self.frozen:
            self.frozen = step < self.freeze_steps
            transfer.set_backbone_trainable(self.model, not self.frozen)
            self.retrace()
            log(f"backbone frozen until step {self.freeze_steps} (head only)" if self.frozen
                else f"backbone unfrozen at step {step}")

    def limit(self, step: int, num_steps: int) -> int:
        """A loop does not cross the unfreezing step."""
        return min(num_steps, self.freeze_steps - step) if self.frozen else num_steps

    def before_finish(self) -> None:
        if self.frozen:  # a run that ends frozen still saves a trainable model
            transfer.set_backbone_trainable(self.model, True)
            self.frozen = False

    close = before_finish


class StopSignal(Action):
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

    def stop_requested(self, here_only: bool) -> str | None:
        asked = self.received if here_only else self.requested
        if not asked:
            return None
        sig = self.received[0]
        return f"signal {sig}" if sig else "a stop signal to another worker"

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
