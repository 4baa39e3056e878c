"""One reporting path: each loop's and each evaluation's values go to the console, TensorBoard
and (at the end) results.json from the same dict, and the speed statistics are kept here."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from data.progress import format_duration

from trainer.config import RunPlan
from trainer.report import summaries
from trainer.report.performance import Speedometer

if TYPE_CHECKING:  # the report takes the loop's values; it never imports the loop
    from trainer.loop.runner import LoopResult


def log(message: str) -> None:
    print(message, flush=True)


def per_class_recall_markdown(recall: dict[str, float | None]) -> str:
    """The recall of each class present, lowest first (the classes to look at)."""
    rows = sorted((r, name) for name, r in recall.items() if r is not None)
    return "\n".join(["| class | recall |", "|---|---|"] +
                     [f"| {name} | {r:.4f} |" for r, name in rows])


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where a progress bar replaces the loop lines)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def notebook_bar(total_steps: int):
    """A tqdm.auto bar over the run's steps in a notebook, else None (console lines)."""
    if not in_notebook():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total_steps, unit="step", desc="training")


class Reporter:
    def __init__(self, plan: RunPlan, writers: summaries.Summaries, speed: Speedometer,
                 input_is_upper_bound: bool, learning_rate: Callable[[int], float]):
        """`learning_rate(step)`: the schedule's rate at a step (loop/optimization.py)."""
        self.plan, self.writers, self.speed = plan, writers, speed
        self.learning_rate = learning_rate
        # With several replicas on one CPU the input timer also catches the other logical
        # device's work: an upper bound, shown as such (docs/benchmarks.md).
        self.input_mark = "<=" if input_is_upper_bound else ""
        self.loop_rates: list[float] = []
        self.input_shares: list[float] = []
        self.first_loop_seconds: float | None = None
        self.overhead_seconds = 0.0  # checkpoints and summaries inside the loop
        self.start_time = time.time()
        self.bar = notebook_bar(plan.total_steps)

    @contextlib.contextmanager
    def overhead(self):
        """Time spent in the block counts as checkpoint and summary overhead."""
        start = time.time()
        try:
            yield
        finally:
            self.overhead_seconds += time.time() - start

    def train_loop(self, result: "LoopResult") -> dict[str, float]:
        """The loop's values (metrics, learning rate, speed), written and printed."""
        plan = self.plan
        rate = result.num_steps * plan.global_batch_size / result.seconds
        if self.first_loop_seconds is None:
            self.first_loop_seconds = result.seconds  # includes tracing: not a steady rate
        else:
            self.loop_rates.append(rate)
            if result.input_seconds is not None:
                self.input_shares.append(result.input_seconds / result.seconds)
        values = dict(result.metrics, learning_rate=self.learning_rate(result.last_step),
                      images_per_second=rate, step_time_ms=1000 * result.seconds /
                      result.num_steps, mfu=self.speed.mfu(rate))
        if result.input_seconds is not None:
            values["input_wait_share"] = result.input_seconds / result.seconds
        with self.overhead():
            self.writers.scalars(self.writers.train, result.last_step, values, "train")
            remaining = (plan.total_steps - result.last_step) * plan.global_batch_size / (
                np.mean(self.loop_rates) if self.loop_rates else rate)
            share = values.get("input_wait_share")
            input_text = "" if share is None else f"input {self.input_mark}{share:.0%} "
            if self.bar is not None:
                self.bar.update(result.last_step - self.bar.n)
                self.bar.set_postfix_str(f"loss {values['loss']:.4f} acc "
                                         f"{values['accuracy']:.4f} {rate:.1f} img/s")
                return values
            log(f"epoch {plan.epoch_of(result.last_step - 1) + 1} step {result.last_step}/"
                f"{plan.total_steps} loss {values['loss']:.4f} acc {values['accuracy']:.4f} "
                f"lr {values['learning_rate']:.3g} {rate:.1f} img/s {input_text}"
                f"MFU {values['mfu']:.1%} ETA {format_duration(remaining)}")
        return values

    def evaluation(self, split: str, step: int, values: dict, final: bool) -> None:
        self.writers.scalars(self.writers.eval, step, values, split)
        recall = values.get("per_class_recall")
        if recall:
            self.writers.text(self.writers.eval, step, f"{split}/per_class_recall",
                              per_class_recall_markdown(recall))
        head = f"final {split}:" if final else f"  {split}"
        tail = f" ({values['images']} images)" if final else ""
        balanced = f" bal acc {values['balanced_accuracy']:.4f}" \
            if "balanced_accuracy" in values else ""
        log(f"{head} loss {values['loss']:.4f} acc {values['accuracy']:.4f}{balanced} "
            f"top5 {values['top5_accuracy']:.4f}{tail}")

    def speed_results(self) -> dict:
        """Steady-state speed of this process's loops (None for a process that ran none)."""
        rate = float(np.mean(self.loop_rates)) if self.loop_rates else None
        return dict(
            images_per_second=rate, mfu=self.speed.mfu(rate) if rate else None,
            train_flops_per_image=self.speed.train_flops_per_image,
            ceiling_flops=self.speed.ceiling,
            input_wait_share=float(np.mean(self.input_shares)) if self.input_shares else None,
            checkpoint_and_summary_share=self.overhead_seconds / max(
                1e-9, time.time() - self.start_time),
            first_loop_seconds=self.first_loop_seconds)
