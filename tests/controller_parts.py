"""A controller over a real RunState (real CheckpointKeeper and BestCheckpoint writing into a
temporary folder; only the fields the controller and the actions read are filled) with a runner
that advances the step counter instead of training: the controller's and the actions'
decisions are what tests/test_controller.py and tests/test_actions.py test."""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from data import layout
from trainer.config import Config, RunPlan
from trainer.loop.controller import Controller
from trainer.loop.inputs import Inputs
from trainer.loop.run_state import RunState
from trainer.loop.runner import LoopResult
from trainer.report import summaries
from trainer.report.console import Reporter
from trainer.report.performance import Speedometer
from trainer.state import checkpoints, run_dir


class CountingRunner:
    """Runs `num_steps` by adding them to the step counter; records each call."""

    def __init__(self, state: RunState, valid_loss=lambda step: 1.0 / step,
                 train_loss=lambda step: 1.0):
        self.state, self.loops, self.evaluations = state, [], []
        self.valid_loss, self.train_loss = valid_loss, train_loss
        self.input_restarts = 0

    def restart_input(self) -> None:  # after a rollback: the input starts at the new position
        self.input_restarts += 1

    def train(self, num_steps: int) -> LoopResult:
        first = self.state.current_step + 1
        self.state.step.assign_add(num_steps)
        self.loops.append((first, num_steps))
        losses = np.array([self.train_loss(first + i) for i in range(num_steps)])
        return LoopResult(first, num_steps, losses, seconds=0.01,
                          input_seconds=None, metrics={"loss": 1.0, "accuracy": 0.5},
                          batch_ids=np.zeros((num_steps, 0)))

    def evaluate(self, split: str):
        step = self.state.current_step
        self.evaluations.append((split, step))
        return {"loss": self.valid_loss(step), "accuracy": 0.5, "top5_accuracy": 1.0,
                "images": 8}, None


def small_state(tmp_path, *, total_steps=20, steps_per_loop=4, eval_every=10, checkpoint_every=5,
           **options):
    config = Config(data_dir=str(tmp_path), model_dir=str(tmp_path), steps_per_loop=steps_per_loop,
                    eval_every_steps=eval_every, checkpoint_every_steps=checkpoint_every,
                    **options)
    plan = dataclasses.replace(RunPlan.make(config, 1, 320), total_steps=total_steps)
    no_files = layout.SplitFiles("valid", (), ())
    step, skipped, rollbacks = (tf.Variable(0, dtype=tf.int64) for _ in range(3))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    keeper = checkpoints.CheckpointKeeper(
        str(tmp_path / run_dir.CHECKPOINT_DIR), model=model, optimizer=optimizer, step=step,
        max_to_keep=10, every_steps=checkpoint_every, skipped_batches=skipped,
        rollbacks=rollbacks)
    best = checkpoints.BestCheckpoint(str(tmp_path / run_dir.BEST_DIR), keeper.checkpoint,
                                      metric=config.best_metric)
    fields = {f.name: None for f in dataclasses.fields(RunState)}
    return RunState(**dict(fields, config=config, plan=plan, chief=True, work_dir=str(tmp_path),
                           inputs=Inputs(["a", "b"], no_files, {"valid": no_files}),
                           model=model, optimizer=optimizer, step=step,
                           skipped_batches=skipped, rollbacks=rollbacks,
                           keeper=keeper, best=best, writers=summaries.Summaries(None)))


def quiet_reporter(state) -> Reporter:
    """A real Reporter of `state`'s writers, with a fixed speed ceiling and learning rate."""
    return Reporter(state.plan, state.writers, Speedometer(1.0, 1e15),
                    input_is_upper_bound=False, learning_rate=lambda step: 0.1)


def counting_controller(state, extra_actions=(), **runner_options):
    runner = CountingRunner(state, **runner_options)
    return Controller(state, runner, quiet_reporter(state), list(extra_actions)), runner


def saved_steps(state) -> list[int]:
    return [run_dir.SavedRun.checkpoint_step(path)
            for path in state.keeper.manager.checkpoints]
