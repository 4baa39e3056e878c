"""The inner trainer (Orbit's "trainer" to controller.py's "controller"): runs N training steps
in one compiled call and evaluates a split, and owns the input iterators. What `train` returns
is what gets reported."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf

from trainer.loop import inputs as run_inputs
from trainer.loop import service_watch
from trainer.loop.run_state import RunState
from trainer.loop.service_watch import ServiceWatch
from trainer.tools import analysis


@dataclasses.dataclass
class LoopResult:
    first_step: int  # 1-based number of the loop's first step
    num_steps: int
    step_losses: np.ndarray  # the true mean loss of each step's global batch
    seconds: float
    input_seconds: float | None  # time in next(iterator); None when not timed (--deterministic)
    metrics: dict[str, float]  # loss, accuracy, top5_accuracy over the loop
    batch_ids: np.ndarray  # [steps, global batch] image ids with --debug_record_batches

    @property
    def last_step(self) -> int:
        return self.first_step + self.num_steps - 1


class StepRunner:
    def __init__(self, state: RunState):
        self.state = state
        self.iterator = None
        self._eval_datasets = {}
        # --data_service: the waits on the service bounded (InputLost, see service_watch.py).
        self.watch = ServiceWatch(state.config.data_service, state.config.data_service_timeout,
                                  lambda: int(state.step.numpy())) \
            if state.config.data_service else None

    def restart_input(self) -> None:
        """(Re)start the training input at the state's data position: after the restore, and
        after a rollback skipped batches."""
        s = self.state
        if self.watch:  # registering the dataset would block for an hour on a dead dispatcher
            self.watch.wait_for_dispatcher()
        self.iterator = run_inputs.train_iterator(s.config, s.plan, s.inputs, s.strategy,
                                                  s.position, s.end_position)
        if self.watch:  # never destroyed (see service_watch.KEPT_ITERATORS)
            service_watch.KEPT_ITERATORS.append(self.iterator)

    def train(self, num_steps: int) -> LoopResult:
        s = self.state
        if self.iterator is None:
            self.restart_input()
        first_step = s.current_step + 1
        s.train_metrics.reset()
        start = time.time()
        args = (self.iterator, tf.constant(num_steps, tf.int32))
        if self.watch:
            # Traced first, so that the watch's clock does not count the tracing.
            s.steps.train_loop.get_concrete_function(*args)
            outputs = self.watch.run(s.steps.train_loop, *args)
        else:
            outputs = s.steps.train_loop(*args)
        step_losses, input_seconds, batch_ids = outputs
        step_losses = step_losses.numpy()
        seconds = time.time() - start
        metrics = s.train_metrics.results()
        del metrics["images"]
        return LoopResult(first_step, num_steps, step_losses, seconds,
                          float(input_seconds) if s.steps.time_input else None, metrics,
                          batch_ids.numpy())

    def evaluate(self, split: str) -> tuple[dict, analysis.Predictions]:
        """One pass over `split` with the weights the model holds: its values (loss, accuracy,
        top-5, balanced accuracy, image count and the recall of each class, `per_class_recall`:
        class name -> recall, None for a class `split` lacks) and its predictions (every
        image's logits and label, and with --eval_figures a gallery of misclassified images),
        from which the figures and the calibration are made: no other pass."""
        s = self.state
        if split not in self._eval_datasets:
            self._eval_datasets[split] = run_inputs.eval_dataset(s.config, s.plan, s.inputs,
                                                                 s.strategy, split)
        s.eval_metrics.reset()
        outputs = s.steps.eval_loop(self._eval_datasets[split], gallery_size=analysis.GALLERY_SIZE
                                    if s.config.eval_figures else 0)
        values = s.eval_metrics.results()
        values["per_class_recall"] = dict(zip(s.inputs.class_names, values["per_class_recall"]))
        # files=[]: the order of the global batches is the files' only with one input pipeline.
        return values, analysis.Predictions([], outputs.labels, outputs.logits,
                                            outputs.gallery_index, outputs.gallery_images)
