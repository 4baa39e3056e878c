"""Finishing: the phase after the last training step, in this order:

  1. the final checkpoint (unless the latest one already holds the last step); when early
     stopping ended the run, the model then takes the best checkpoint's weights, and every
     output below holds those (results.json: "weights_step", "stopped"); a best checkpoint
     that cannot be read is one warning line and the outputs hold the last step's weights
     ("best_checkpoint_error")
  2. the final evaluation of every split, one pass each (runner.evaluate): the metrics, and the
     logits, labels and misclassified images that the figures (actions.EvalFigures) and the
     calibration use; valid also updates the best checkpoint
  3. calibration (chief): one temperature fitted on the valid split's logits, the expected
     calibration error before and after on every split, reliability diagrams in TensorBoard
     (trainer/tools/calibration.py); results.json "calibration"
  4. model.keras (written under a temporary name, then renamed)
  5. the SavedModel export (export/<step>/, staged then renamed; trainer/tools/serving.py),
     whose signature returns the calibrated probabilities (and `unknown` under
     --unknown_below)
  6. results.json, written last and atomically: its presence, naming the last step, marks a
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
import tensorflow as tf

from data import files
from trainer.loop.controller import Controller
from trainer.report import figures
from trainer.state import checkpoints, run_dir
from trainer.tools import calibration, serving


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
    controller.before_finish()  # e.g. a frozen backbone unfrozen: the saved model trains
    weights_step, problem = _restore_best_weights(s, step) if controller.stopped_early \
        else (step, None)
    results = {"steps": step, "epochs": step / plan.steps_per_epoch, "splits": {},
               "weights": f"moving average (--ema_decay={config.ema_decay:g})"
               if s.weight_average else "trained",
               "weights_step": weights_step,
               "stopped": controller.stopped_early or "end of schedule"}
    if problem:
        results["best_checkpoint_error"] = problem
    predictions = {}  # one pass per split: the metrics, and the logits for calibration
    for split in s.inputs.eval_splits:
        _stop_if_asked(controller)
        results["splits"][split], predictions[split] = controller.evaluate(split, step,
                                                                            final=True)
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
    results["calibration"] = _calibrate(s, step, predictions)
    temperature = results["calibration"]["temperature"] if results["calibration"] else 1.0
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
            os.path.join(config.model_dir, run_dir.EXPORT_DIR), version=step, overwrite=True,
            temperature=temperature, unknown_below=config.unknown_below,
            eval_crop=config.eval_crop)
        print(f"exported for serving: {results['export_dir']}", flush=True)
    # A signal during the outputs above (an export takes seconds) stops here: results.json is
    # not written, so the restart finishes the run; never exit 0 past a stop signal.
    _stop_if_asked(controller, here_only=True)
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


def _calibrate(s, step: int, predictions: dict) -> dict | None:
    """Temperature scaling fitted on valid (None without a valid split): the temperature, and
    per split the ECE, NLL and accuracy before and after; a reliability diagram per split
    (with --eval_figures).
    `predictions`: each split's from its final evaluation (the evaluated weights)."""
    if "valid" not in predictions:
        return None
    logits = {split: (p.logits, p.labels) for split, p in predictions.items()}
    temperature = calibration.fit_temperature(*logits["valid"])
    result = {"temperature": temperature, "fitted_on": "valid", "ece_bins": calibration.ECE_BINS}
    if calibration.all_correct(*logits["valid"]):
        result["fitted_on"] = "nothing: every valid image is classified correctly"
        print("calibration: every valid image is classified correctly, so no temperature can "
              "be fitted (the likelihood grows without bound as T -> 0); T stays 1", flush=True)
    for split, (split_logits, labels) in logits.items():
        result[split] = report = calibration.calibration_report(split_logits, labels, temperature)
        s.writers.scalars(s.writers.eval, step, {k: report[k] for k in ("ece_before", "ece_after")},
                          f"{split}/calibration")
        if s.config.eval_figures:
            s.writers.image(s.writers.eval, step, f"{split}/reliability_diagram",
                            figures.reliability_diagram(
                                calibration.reliability(calibration.softmax(split_logits), labels),
                                calibration.reliability(
                                    calibration.softmax(split_logits, temperature), labels),
                                f"{split}: temperature {temperature:.3f} (fitted on valid)"))
        print(f"calibration on {split}: ECE {report['ece_before']:.4f} -> "
              f"{report['ece_after']:.4f}, NLL {report['nll_before']:.4f} -> "
              f"{report['nll_after']:.4f} (temperature {temperature:.3f}, fitted on valid)",
              flush=True)
    s.writers.flush()
    return result


def _restore_best_weights(s, step: int) -> tuple[int, str | None]:
    """The best checkpoint's model weights (and averages) into the model: (its step, None). The
    run's counters and optimizer stay those of the last step (a restart finishes the same way).
    A best checkpoint that cannot be read (no record, files missing or of another model) is one
    line, and the outputs hold the last step's weights: (step, that line)."""
    best = s.best.summary()
    parts = {"model": s.model}
    if s.weight_average:
        parts["ema"] = s.weight_average.trackable
    try:
        if best is None:
            raise checkpoints.CheckpointMismatch("no best checkpoint recorded")
        checkpoints.restore_objects(best["path"], **parts)
    except checkpoints.CheckpointMismatch as e:
        s.restore_latest()  # the final checkpoint: the last step's weights, whole again
        problem = f"the best checkpoint could not be restored: {e}"
        print(f"warning: {problem}; the outputs hold the last step's weights (step {step})",
              flush=True)
        return step, problem
    print(f"the outputs hold the best checkpoint's weights: step {best['step']} "
          f"({best['metric']} {best['value']:.4f})", flush=True)
    return int(best["step"]), None


def _save_model_file(s) -> str:
    """model.keras with the weights that are evaluated (the averages with --ema_decay), fsynced
    before its rename and the folder after (a power cut leaves the old file or the whole new
    one, never an empty one; data/files.py)."""
    path = os.path.join(s.config.model_dir, run_dir.MODEL_FILE)
    tmp_path = os.path.join(s.config.model_dir, ".model.tmp.keras")
    with s.averaged():
        s.model.save(tmp_path)
    files.fsync_path(tmp_path)
    os.replace(tmp_path, path)
    files.fsync_path(s.config.model_dir)
    return path


def _stop_if_asked(controller: Controller, here_only: bool = False) -> None:
    controller.preempt_if_requested(" while finishing", here_only)
