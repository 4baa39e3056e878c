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

VERSION_RULE = "--version must be step, timestamp or a non-negative integer"
TEMPERATURE_RULE = "--temperature must be auto or a number > 0"
FORMATS = ("saved_model", "tflite")


def _version_ok(value: str) -> bool:
    return value in ("step", "timestamp") or value.isdigit()


def _temperature_ok(value: str) -> bool:
    try:
        return value == "auto" or float(value) > 0
    except ValueError:
        return False


def define_flags() -> None:
    """The command line's flags, defined only when it runs: trainer.api imports this module
    beside the training flags, which share some names."""
    flags.DEFINE_string("model_dir", None, "The training run directory.")
    flags.DEFINE_string("checkpoint", "latest", "latest, best (highest valid accuracy), or a "
                        "checkpoint path (prefix or directory).")
    flags.DEFINE_string("version", "step", "Version folder name: `step` (the checkpoint's "
                        "global step), `timestamp` (seconds since 1970), or an integer.")
    flags.DEFINE_string("export_root", None, "Parent of the version folders (default: "
                        "model_dir/export).")
    flags.DEFINE_integer("top_k", 5, "Classes returned per image (at most the number of "
                         "classes).", lower_bound=1)
    flags.DEFINE_boolean("overwrite", False, "Replace an existing export of the same version.")
    flags.DEFINE_enum("format", "saved_model", list(FORMATS), "saved_model: TF "
                      "Serving's layout under export_root (default model_dir/export); tflite: "
                      "model.tflite (float32) and model_float16.tflite (float16 weights) taking "
                      "resized pixels, with classes.json, under export_root (default "
                      "model_dir/tflite).")
    flags.DEFINE_string("temperature", "auto", "Divide the logits by this before the softmax: "
                        "a number > 0, or `auto`: the run's calibration temperature "
                        "(results.json) when the checkpoint holds the weights it was fitted "
                        "for, else 1.")
    flags.DEFINE_float("unknown_below", 0.0, "Name the top-1 class `unknown` when its "
                       "probability is below this; 0: off.", lower_bound=0.0, upper_bound=1.0)
    flags.mark_flag_as_required("model_dir")
    flags.register_validator("version", _version_ok, message=VERSION_RULE)
    flags.register_validator("temperature", _temperature_ok, message=TEMPERATURE_RULE)


FLAGS = flags.FLAGS


def _temperature(run: SavedRun, step: int | None, temperature: str) -> tuple[float, str]:
    """--temperature as a number, and where it came from."""
    if temperature != "auto":
        return float(temperature), "--temperature"
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
    export_run(FLAGS.model_dir, checkpoint=FLAGS.checkpoint, format=FLAGS.format,
               version=FLAGS.version, export_root=FLAGS.export_root, top_k=FLAGS.top_k,
               overwrite=FLAGS.overwrite, temperature=FLAGS.temperature,
               unknown_below=FLAGS.unknown_below)
    return 0


def export_run(model_dir: str, *, checkpoint: str = "latest", format: str = "saved_model",
               version: str | int = "step", export_root: str | None = None, top_k: int = 5,
               overwrite: bool = False, temperature: str | float = "auto",
               unknown_below: float = 0.0) -> str:
    """What `python -m trainer.export` does (see the module doc), with the flags as
    arguments; returns the version folder written."""
    version, temperature = str(version), str(temperature)
    for ok, rule in ((_version_ok(version), VERSION_RULE),
                     (_temperature_ok(temperature), TEMPERATURE_RULE),
                     (format in FORMATS, f"--format must be one of {', '.join(FORMATS)}"),
                     (top_k >= 1 and 0 <= unknown_below <= 1,
                      "--top_k must be >= 1 and --unknown_below in [0, 1]")):
        if not ok:
            raise tool_flags.ToolError(rule)
    run = SavedRun.load(model_dir)
    checkpoint = run.checkpoint_path(checkpoint)
    tool_flags.import_tensorflow()
    from trainer.state.checkpoints import restore_model
    from trainer.tools import serving
    step = run.checkpoint_step(checkpoint)
    if version == "step" and step is None:
        raise tool_flags.ToolError(f"--version=step: checkpoint {checkpoint} holds no global "
                                   f"step; pass --version=timestamp or an integer")
    version = {"step": step, "timestamp": int(time.time())}.get(version) \
        if version in ("step", "timestamp") else int(version)
    export_root = export_root or os.path.join(
        run.model_dir, "tflite" if format == "tflite" else "export")
    if os.path.exists(os.path.join(export_root, str(version))) and not overwrite:
        raise tool_flags.ToolError(f"{os.path.join(export_root, str(version))} already exists "
                                   f"(versions are never overwritten; pass --overwrite or "
                                   f"another --version)")
    model = restore_model(run, checkpoint)
    temperature, source = _temperature(run, step, temperature)
    done = f"exported checkpoint {checkpoint} (step {step}) to"
    if format == "tflite":
        path = serving.export_tflite(model, run.class_names, run.image_size, export_root,
                                     version, temperature=temperature,
                                     unknown_below=unknown_below, overwrite=overwrite,
                                     eval_crop=run.eval_crop)
        print(f"{done} {path}: {', '.join(serving.TFLITE_FILES.values())} (pixels [N, "
              f"{run.image_size}, {run.image_size}, 3] in 0-255 -> probabilities), "
              f"classes.json, {serving.PREPROCESSING_FILE} ({_pixels(run)}); temperature "
              f"{temperature:.4g} ({source})")
        return path
    try:
        path = serving.export(model, run.class_names, run.image_size, export_root, version,
                              top_k=top_k, overwrite=overwrite, temperature=temperature,
                              unknown_below=unknown_below, eval_crop=run.eval_crop)
    except serving.ExportError as e:
        raise tool_flags.ToolError(str(e)) from None
    print(f"{done} {path}: SavedModel (signature {serving.SIGNATURE}: {serving.INPUT_NAME} = "
          f"encoded images -> top {min(top_k, len(run.class_names))} classes, probabilities) "
          f"and {os.path.join(path, serving.KERAS_FILE)}; {_pixels(run)}; temperature "
          f"{temperature:.4g} ({source})"
          + (f", top-1 below {unknown_below:g} named {serving.UNKNOWN}" if unknown_below else ""))
    return path


def entry() -> None:
    define_flags()
    tool_flags.run(PROGRAM, main, errors=(RunError,))


if __name__ == "__main__":
    entry()
