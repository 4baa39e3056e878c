"""Export a run's checkpoint for serving:

    python -m trainer.export --model_dir=DIR [--checkpoint=latest|best|PATH] [--version=step]
                             [--temperature=auto|T] [--unknown_below=P] [--format=tflite]

Writes model_dir/export/<version>/ (a SavedModel whose serving_default signature takes encoded
images and returns the top-k class names and calibrated probabilities, plus model.keras); see
trainer/tools/serving.py. Training exports its final model the same way. The signature decodes
with the run's --eval_crop (data.decode.decode_for_eval), so it predicts as the run's
evaluations did; preprocessing.json beside the model records that policy (a TFLite app must
apply it to its pixels).
"""
from __future__ import annotations

import os
import time

from trainer.tools import tool_flags
from absl import flags  # noqa: E402

from trainer.state.run_dir import RunError, SavedRun, read_json  # noqa: E402

PROGRAM = "export"

flags.DEFINE_string("model_dir", None, "The training run directory.")
flags.DEFINE_string("checkpoint", "latest", "latest, best (highest valid accuracy), or a "
                    "checkpoint path (prefix or directory).")
flags.DEFINE_string("version", "step", "Version folder name: `step` (the checkpoint's global "
                    "step), `timestamp` (seconds since 1970), or an integer.")
flags.DEFINE_string("export_root", None, "Parent of the version folders (default: "
                    "model_dir/export).")
flags.DEFINE_integer("top_k", 5, "Classes returned per image (at most the number of classes).",
                     lower_bound=1)
flags.DEFINE_boolean("overwrite", False, "Replace an existing export of the same version.")
flags.DEFINE_enum("format", "saved_model", ["saved_model", "tflite"], "saved_model: TF "
                  "Serving's layout under export_root (default model_dir/export); tflite: "
                  "model.tflite (float32) and model_float16.tflite (float16 weights) taking "
                  "resized pixels, with classes.json, under export_root (default "
                  "model_dir/tflite).")
flags.DEFINE_string("temperature", "auto", "Divide the logits by this before the softmax: a "
                    "number > 0, or `auto`: the run's calibration temperature (results.json) "
                    "when the checkpoint holds the weights it was fitted for, else 1.")
flags.DEFINE_float("unknown_below", 0.0, "Name the top-1 class `unknown` when its probability "
                   "is below this; 0: off.", lower_bound=0.0, upper_bound=1.0)
flags.mark_flag_as_required("model_dir")


@flags.validator("version", message="--version must be step, timestamp or a non-negative integer")
def _version_ok(value: str) -> bool:
    return value in ("step", "timestamp") or value.isdigit()


@flags.validator("temperature", message="--temperature must be auto or a number > 0")
def _temperature_ok(value: str) -> bool:
    try:
        return value == "auto" or float(value) > 0
    except ValueError:
        return False


FLAGS = flags.FLAGS


def _temperature(run: SavedRun, step: int | None) -> tuple[float, str]:
    """--temperature as a number, and where it came from."""
    if FLAGS.temperature != "auto":
        return float(FLAGS.temperature), "--temperature"
    path = os.path.join(run.model_dir, "results.json")
    results = read_json(path) if os.path.exists(path) else {}
    calibrated = results.get("calibration")
    if calibrated and step is not None and results.get("weights_step", results.get("steps")) \
            == step:
        return float(calibrated["temperature"]), f"fitted on valid for step {step}"
    return 1.0, "uncalibrated: no calibration of this checkpoint's weights in results.json"


def _pixels(run: SavedRun) -> str:
    """The evaluation pixels the export decodes (or, for TFLite, expects): the run's."""
    if run.eval_crop == 1.0:
        return "eval pixels squashed (--eval_crop=1)"
    return f"eval pixels centre-cropped (--eval_crop={run.eval_crop:g})"


def main(argv: list[str]) -> int:
    tool_flags.reject_positional(argv)
    run = SavedRun.load(FLAGS.model_dir)
    checkpoint = run.checkpoint_path(FLAGS.checkpoint)
    tool_flags.import_tensorflow()
    from trainer.tools import serving
    step = run.checkpoint_step(checkpoint)
    if FLAGS.version == "step" and step is None:
        raise tool_flags.ToolError(f"--version=step: checkpoint {checkpoint} holds no global "
                                   f"step; pass --version=timestamp or an integer")
    version = {"step": step, "timestamp": int(time.time())}.get(FLAGS.version) \
        if FLAGS.version in ("step", "timestamp") else int(FLAGS.version)
    export_root = FLAGS.export_root or os.path.join(
        run.model_dir, "tflite" if FLAGS.format == "tflite" else "export")
    if os.path.exists(os.path.join(export_root, str(version))) and not FLAGS.overwrite:
        raise tool_flags.ToolError(f"{os.path.join(export_root, str(version))} already exists "
                                   f"(versions are never overwritten; pass --overwrite or "
                                   f"another --version)")
    model = run.restore_model(checkpoint)
    temperature, source = _temperature(run, step)
    if FLAGS.format == "tflite":
        path = serving.export_tflite(model, run.class_names, run.image_size, export_root,
                                     version, temperature=temperature,
                                     unknown_below=FLAGS.unknown_below, overwrite=FLAGS.overwrite,
                                     eval_crop=run.eval_crop)
        print(f"exported checkpoint {checkpoint} (step {step}) to {path}: "
              f"{', '.join(serving.TFLITE_FILES.values())} (pixels [N, {run.image_size}, "
              f"{run.image_size}, 3] in 0-255 -> probabilities), classes.json, "
              f"{serving.PREPROCESSING_FILE} ({_pixels(run)}); temperature "
              f"{temperature:.4g} ({source})")
        return 0
    try:
        path = serving.export(model, run.class_names, run.image_size, export_root, version,
                              top_k=FLAGS.top_k, overwrite=FLAGS.overwrite,
                              temperature=temperature, unknown_below=FLAGS.unknown_below,
                              eval_crop=run.eval_crop)
    except serving.ExportError as e:
        raise tool_flags.ToolError(str(e)) from None
    print(f"exported checkpoint {checkpoint} (step {step}) to {path}: SavedModel "
          f"(signature {serving.SIGNATURE}: {serving.INPUT_NAME} = encoded images -> top "
          f"{min(FLAGS.top_k, len(run.class_names))} classes, probabilities) and "
          f"{os.path.join(path, serving.KERAS_FILE)}; {_pixels(run)}; temperature "
          f"{temperature:.4g} ({source})"
          + (f", top-1 below {FLAGS.unknown_below:g} named {serving.UNKNOWN}"
             if FLAGS.unknown_below else ""))
    return 0


def entry() -> None:
    tool_flags.run(PROGRAM, main, errors=(RunError,))


if __name__ == "__main__":
    entry()
