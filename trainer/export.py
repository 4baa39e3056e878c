"""Export a run's checkpoint for serving:

    python -m trainer.export --model_dir=DIR [--checkpoint=latest|best|PATH] [--version=step]

Writes model_dir/export/<version>/ (a SavedModel whose serving_default signature takes encoded
images and returns the top-k class names and probabilities, plus model.keras); see
trainer/serving.py. Training exports its final model the same way.
"""
from __future__ import annotations

import os
import time

from trainer.tools import tool_flags
from absl import flags  # noqa: E402

from trainer.state.run_dir import RunError, SavedRun  # noqa: E402

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
flags.mark_flag_as_required("model_dir")


@flags.validator("version", message="--version must be step, timestamp or a non-negative integer")
def _version_ok(value: str) -> bool:
    return value in ("step", "timestamp") or value.isdigit()


FLAGS = flags.FLAGS


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
    export_root = FLAGS.export_root or os.path.join(run.model_dir, "export")
    if os.path.exists(os.path.join(export_root, str(version))) and not FLAGS.overwrite:
        raise tool_flags.ToolError(f"{os.path.join(export_root, str(version))} already exists "
                                   f"(versions are never overwritten; pass --overwrite or "
                                   f"another --version)")
    model = run.restore_model(checkpoint)
    try:
        path = serving.export(model, run.class_names, run.image_size, export_root, version,
                              top_k=FLAGS.top_k, overwrite=FLAGS.overwrite)
    except serving.ExportError as e:
        raise tool_flags.ToolError(str(e)) from None
    print(f"exported checkpoint {checkpoint} (step {step}) to {path}: SavedModel "
          f"(signature {serving.SIGNATURE}: {serving.INPUT_NAME} = encoded images -> top "
          f"{min(FLAGS.top_k, len(run.class_names))} classes, probabilities) and "
          f"{os.path.join(path, serving.KERAS_FILE)}")
    return 0


def entry() -> None:
    tool_flags.run(PROGRAM, main, errors=(RunError,))


if __name__ == "__main__":
    entry()
