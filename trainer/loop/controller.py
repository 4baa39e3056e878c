"""The controller (Orbit's split): the loop of loops. It decides how many steps each compiled call
runs, when to evaluate, save and stop; the runner (runner.py) runs the steps; actions
(actions.py) do the extras; the reporter (report/console.py) writes what the runner returns."""
from __future__ import annotations

from trainer.errors import EXIT_PREEMPTED, Preempted
from trainer.loop.actions import Action
from trainer.loop.runner import StepRunner
from trainer.loop.run_state import RunState
from trainer.loop.service_watch import InputLost
from trainer.report.console import Reporter, log

__all__ = ["Controller", "EXIT_PREEMPTED", "Preempted"]  # the last two: trainer.errors'


class Controller:
    def __init__(self, state: RunState, runner: StepRunner, reporter: Reporter,
                 actions: list[Action]):
        for action in actions:
            if not isinstance(action, Action):
                raise TypeError(f"{type(action).__name__} is not an actions.Action")
        self.state, self.runner, self.reporter, self.actions = state, runner, reporter, actions
        self.eval_every = state.config.eval_every_steps or state.plan.steps_per_epoch
        self.last_step = state.current_step  # the last step known done (for error messages)
        self.stopped_early: str | None = None  # the line saying why, when an action stopped

    def train(self) -> None:
        """Loops until the last step, or until an action asks to stop (early stopping: also
        right away after a restart of a run that had stopped); raises Preempted after a stop
        signal (checkpoint saved)."""
        s, total = self.state, self.state.plan.total_steps
        while s.current_step < total:
            self.stopped_early = self._stop_reason()
            if self.stopped_early:
                log(self.stopped_early)
                return
            step = s.current_step
            self._each("at_loop_start", step)
            num = self._loop_length(step)
            self._each("before_loop", step + 1, step + num)
            try:
                result = self.runner.train(num)
            except InputLost as e:
                self.input_lost(e)
            if not all([action.accept(result) for action in self.actions]):
                continue  # rolled back to the latest checkpoint: the loop is undone
            self.last_step = result.last_step
            self.reporter.train_loop(result)
            self._each("after_loop", result)
            if result.last_step % self.eval_every == 0 and result.last_step < total and \
                    "valid" in s.inputs.eval_splits:
                self.evaluate("valid", result.last_step)
            with self.reporter.overhead():
                s.keeper.save()
                s.writers.flush()
            self.preempt_if_requested("")

    def evaluate(self, split: str, step: int, final: bool = False) -> tuple[dict, object]:
        """Evaluates the weights that are exported (the averages with --ema_decay) in one pass
        over `split`: (values, predictions), which the actions get too (runner.evaluate)."""
        with self.state.averaged():
            values, predictions = self.runner.evaluate(split)
        self.reporter.evaluation(split, step, values, final)
        self._each("after_evaluation", split, step, values, predictions)
        return values, predictions

    def preempt_if_requested(self, during: str, here_only: bool = False) -> None:
        """Stop (Preempted) if an action says a stop was asked for. Every action is asked, on
        every worker at the same points (a collective there), unless `here_only`."""
        causes = [action.stop_requested(here_only) for action in self.actions]
        cause = next((c for c in causes if c), None)
        if cause:
            self.preempt(during, cause)

    def preempt(self, during: str, cause: str) -> None:
        """Save (in the loop; while finishing the final checkpoint exists) and stop."""
        s = self.state
        path = s.keeper.manager.latest_checkpoint if during else \
            s.keeper.save(force=True) or s.keeper.manager.latest_checkpoint
        if not s.chief:  # its own copy is in a scratch folder deleted at exit
            path = f"in the chief's {s.config.model_dir}"
        log(f"stopped by {cause}{during} at step {s.current_step}: "
            f"checkpoint {path} saved; run again with the same --model_dir to "
            f"{'finish' if during else 'resume'} (exit code {EXIT_PREEMPTED})")
        raise Preempted(s.current_step)

    def before_finish(self) -> None:
        self._each("before_finish")

    def input_lost(self, lost: InputLost) -> None:
        """The tf.data service stopped feeding the loop (service_watch.py): save the steps
        actually completed (the step counter, so the data position too) and stop like a
        preemption."""
        s = self.state
        path = s.keeper.save(force=True) or s.keeper.manager.latest_checkpoint
        log(f"{lost}: checkpoint {path} saved at step {s.current_step}; run again with the same "
            f"--model_dir to resume (exit code {EXIT_PREEMPTED})")
        raise Preempted(s.current_step)

    def close(self) -> None:
        self._each("close")

    def _loop_length(self, step: int) -> int:
        """Steps of the next compiled call: up to --steps_per_loop, not past the next
        evaluation, the end, or the unfreezing of the backbone."""
        next_eval = (step // self.eval_every + 1) * self.eval_every
        num = min(self.state.config.steps_per_loop, self.state.plan.total_steps - step,
                  next_eval - step)
        for action in self.actions:
            num = action.limit(step, num)
        return num

    def _stop_reason(self) -> str | None:
        return next((reason for reason in (action.stop_reason() for action in self.actions)
                     if reason), None)

    def _each(self, hook: str, *args) -> None:
        for action in self.actions:
            getattr(action, hook)(*args)
