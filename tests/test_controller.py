"""The controller and the actions in process: loop lengths, the evaluation cadence, saves, a
stop signal, early stopping and a rollback, with a runner that advances the step counter
instead of training (the controller's decisions are what is tested; the step is test_step's).

The run state is a real RunState with a real CheckpointKeeper writing real checkpoints into a
temporary folder; only the fields the controller reads are filled (tests/controller_parts.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.controller_parts import counting_controller, saved_steps, small_state
from trainer.errors import Preempted, TrainingError
from trainer.loop import actions, train
from trainer.loop.actions import Action

pytestmark = pytest.mark.quick


def test_loops_stop_at_evaluations_and_the_end_and_saves_follow_the_interval(tmp_path):
    state = small_state(tmp_path, total_steps=23, steps_per_loop=4, eval_every=10,
                        checkpoint_every=5)
    controller, runner = counting_controller(state)
    controller.train()
    # 4-step loops, cut at the evaluations (10, 20) and at the end (23)
    assert runner.loops == [(1, 4), (5, 4), (9, 2), (11, 4), (15, 4), (19, 2), (21, 3)]
    assert runner.evaluations == [("valid", 10), ("valid", 20)]  # none at the last step
    # a save at the first loop end at least 5 steps after the previous save
    assert saved_steps(state) == [4, 10, 18, 23]
    assert state.current_step == 23


def test_a_stop_signal_saves_at_the_loop_end_and_raises_preempted(tmp_path):
    state = small_state(tmp_path, checkpoint_every=100)

    class SignalAtStep(Action):
        def stop_requested(self, here_only):
            return "signal 15" if state.current_step >= 6 else None

    controller, runner = counting_controller(state, [SignalAtStep()])
    with pytest.raises(Preempted) as stopped:
        controller.train()
    assert stopped.value.step == 8 and runner.loops == [(1, 4), (5, 4)]
    assert saved_steps(state)[-1] == 8  # saved although the interval (100) had not passed


def test_an_action_stops_the_run_early_and_limits_and_undoes_loops(tmp_path):
    state = small_state(tmp_path, total_steps=40, steps_per_loop=4, eval_every=10)
    undone = []

    class Course(Action):
        def limit(self, step, num_steps):
            return min(num_steps, 3)  # as the backbone freeze does at its boundary

        def accept(self, result):
            if result.first_step == 4 and not undone:  # as a rollback does: undo this loop
                undone.append(result.first_step)
                state.step.assign_sub(result.num_steps)
                return False
            return True

        def stop_reason(self):
            return "early stop at 20" if state.current_step >= 20 else None

    seen = []

    class Record(Action):
        def after_loop(self, result):
            seen.append(result.first_step)

    controller, runner = counting_controller(state, [Course(), Record()])
    controller.train()
    assert runner.loops[:4] == [(1, 3), (4, 3), (4, 3), (7, 3)]
    assert 4 in seen and seen.count(4) == 1  # the undone loop reached no other action
    assert controller.stopped_early == "early stop at 20" and state.current_step == 20


def test_early_stopping_stops_after_the_patience_and_a_restart_trains_nothing(tmp_path):
    """The real TrackBest and BestCheckpoint: valid loss best at step 10, then two evaluations
    without a lower one (15, 20) with --early_stopping_patience=2: the run stops at 20, the
    best checkpoint holds step 10, and a restart from the saved checkpoint trains nothing."""
    losses = {5: 1.0, 10: 0.8, 15: 0.9, 20: 0.85, 25: 0.5}
    options = dict(total_steps=40, steps_per_loop=5, eval_every=5, checkpoint_every=5,
                   early_stopping_patience=2, best_metric="valid/loss",
                   early_stopping_start="5")
    state = small_state(tmp_path, **options)
    track = actions.TrackBest(train.early_stopping_context(state))
    controller, runner = counting_controller(state, [track], valid_loss=losses.get)
    controller.train()
    assert controller.stopped_early.startswith(
        "early stopping at step 20: valid/loss has not improved for 2 evaluations")
    assert runner.evaluations == [("valid", s) for s in (5, 10, 15, 20)]
    assert state.best.state["step"] == 10 and saved_steps(state)[-1] == 20

    again = small_state(tmp_path, **options)
    again.keeper.restore_latest()
    track = actions.TrackBest(train.early_stopping_context(again))
    controller, runner = counting_controller(again, [track], valid_loss=losses.get)
    controller.train()
    assert runner.loops == [] and controller.stopped_early.startswith(
        "early stopping at step 20")


def _guarded(state, policy, train_loss):
    controller, runner = counting_controller(state, [], train_loss=train_loss)
    controller.actions.insert(0, actions.NonFiniteGuard(train.non_finite_context(state, runner),
                                                        policy))
    return controller, runner


def test_a_non_finite_loss_stops_the_run_without_saving_that_loop(tmp_path):
    """--on_nan=stop (the real NonFiniteGuard): a NaN loss at step 7 ends the run in one line
    naming the step; the checkpoint of that loop is never written."""
    state = small_state(tmp_path, checkpoint_every=1)
    controller, runner = _guarded(state, "stop", lambda step: np.nan if step == 7 else 1.0)
    with pytest.raises(TrainingError, match=r"^non-finite training loss at step 7; stopped "
                                            r"without saving this loop \(latest checkpoint"):
        controller.train()
    assert saved_steps(state) == [4]


def test_a_non_finite_loss_rolls_back_and_skips_the_batches_of_that_loop(tmp_path):
    """--on_nan=rollback: back to the checkpoint of step 4, the 4 batches of the failed loop
    skipped (data position = step + 4), the input restarted there, then on to the end."""
    state = small_state(tmp_path, total_steps=12, checkpoint_every=1)
    poisoned = []

    def loss(step):  # NaN at step 7 the first time only (the batch at position 7 is skipped)
        if step == 7 and not poisoned:
            poisoned.append(step)
            return np.nan
        return 1.0
    controller, runner = _guarded(state, "rollback", loss)
    controller.train()
    assert runner.loops == [(1, 4), (5, 4), (5, 4), (9, 2), (11, 2)]
    assert int(state.skipped_batches.numpy()) == 4 and int(state.rollbacks.numpy()) == 1
    assert runner.input_restarts == 1 and state.position == 12 + 4


def test_a_misspelt_hook_is_an_error_when_the_action_is_defined():
    with pytest.raises(TypeError, match="after_evaluaton is not an action hook"):
        class Typo(Action):  # noqa: F841
            def after_evaluaton(self, split, step, values, predictions):
                pass

    class Fine(Action):
        def after_evaluation(self, split, step, values, predictions):
            pass

        def _helper(self):
            pass
    assert Fine().stop_reason() is None


def test_the_controller_takes_only_actions(tmp_path):
    class NotAnAction:
        def after_loop(self, result):
            pass
    state = small_state(tmp_path)
    with pytest.raises(TypeError, match="NotAnAction is not an actions.Action"):
        counting_controller(state, [NotAnAction()])


def test_every_action_of_the_trainer_is_an_action():
    """Every class of actions.py is an Action, but the frozen contexts the actions declare."""
    defined = [value for value in vars(actions).values()
               if isinstance(value, type) and value.__module__ == actions.__name__
               and value is not Action and not value.__name__.startswith("_")
               and not dataclasses.is_dataclass(value)]
    assert len(defined) >= 10
    assert all(issubclass(cls, Action) for cls in defined), defined
