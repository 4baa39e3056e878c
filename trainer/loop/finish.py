"""Finishing: the phase after the last training step, in this order:

  1. the final checkpoint (unless the latest one already holds the last step)
  2. the final evaluation of every split (valid also updates the best checkpoint)
  3. model.keras (written under a temporary name, then renamed)
  4. the SavedModel export (export/<step>/, staged then renamed; trainer/tools/serving.py)
  5. results.json, written last and atomically: its presence, naming the last step, marks a
     finished run

A stop signal between outputs ends the process with exit code 75; a restart (after that, or
after a kill anywhere in here) restores the final checkpoint and runs the phase again, so the
outputs are those of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from trainer.loop.controller import Controller
from trainer.state import run_dir
from trainer.tools import serving


def finished_results(model_dir: str, step: int) -> dict | None:
    """results.json if the run finished at `step` (an extended run has not)."""
    path = os.path.join(model_dir, run_dir.RESULTS_FILE)
    if not os.path.exists(path):
        return None
    results = run_dir.read_json(path)
    return results if results.get("steps") == step else None


def finish(controller: Controller, run_start: float) -> dict:
    s = controller.state
    step, config, plan = s.current_step, s.config, s.plan
    with controller.reporter.overhead():
        s.keeper.save_at_end(step)
    controller.freeze.close()  # a frozen backbone is unfrozen: the saved model is trainable
    results = {"steps": step, "epochs": step / plan.steps_per_epoch, "splits": {},
               "weights": f"moving average (--ema_decay={config.ema_decay:g})"
               if s.weight_average else "trained"}
    for split in s.inputs.eval_splits:
        _stop_if_asked(controller)
        results["splits"][split] = controller.evaluate(split, step, final=True)
    results["best_checkpoint"] = s.best.summary()
    results["weights_sha256"] = weights_digest(s.model)
    print(f"final weights: sha256 {results['weights_sha256']}", flush=True)  # every worker
    s.writers.flush()
    results.update(controller.reporter.speed_results(), wall_seconds=time.time() - run_start,
                   num_replicas=plan.num_replicas, global_batch_size=plan.global_batch_size)
    if not s.chief:
        return results
    # From here on the chief works alone: its stop checks must not be collective.
    _stop_if_asked(controller, here_only=True)
    results["model_file"] = _save_model_file(s)
    if config.export_at_end:
        _stop_if_asked(controller, here_only=True)
        with s.averaged():
            weights = s.model.get_weights()
        results["export_dir"] = serving.export(
            serving.inference_copy(s.model, config.model, len(s.inputs.class_names),
                                   config.image_size, weights=weights),
            s.inputs.class_names, config.image_size,
            os.path.join(config.model_dir, run_dir.EXPORT_DIR), version=step, overwrite=True)
        print(f"exported for serving: {results['export_dir']}", flush=True)
    path = os.path.join(config.model_dir, run_dir.RESULTS_FILE)
    run_dir.write_json(path, results)
    print(f"results written to {path}", flush=True)
    return results


def weights_digest(model) -> str:
    """A short hash of the model's trained weights: every worker prints it, and they must agree
    (replicas that drifted apart would not)."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def _save_model_file(s) -> str:
    """model.keras with the weights that are evaluated (the averages with --ema_decay)."""
    path = os.path.join(s.config.model_dir, run_dir.MODEL_FILE)
    tmp_path = os.path.join(s.config.model_dir, ".model.tmp.keras")
    with s.averaged():
        s.model.save(tmp_path)
    os.replace(tmp_path, path)
    return path


def _stop_if_asked(controller: Controller, here_only: bool = False) -> None:
    if controller.stop.received if here_only else controller.stop.requested:
        controller.preempt(" while finishing")
