"""Evaluate a run's checkpoint on a split:

    python -m trainer.evaluate --model_dir=DIR [--split=test] [--data_dir=...]
                               [--checkpoint=latest|best|PATH] [--output_dir=...]
                               [--tta=none|flip] [--eval_crop=F]

Restores only the model from the checkpoint, predicts every image of the split once with the
run's evaluation pixels (its --eval_crop, data.decode.decode_for_eval: what its evaluations and
export saw), and writes
<output_dir>/<split>-step<N>.json (loss, top-1, top-5, per-class precision/recall),
-confusion.csv and -predictions.csv (default output_dir: model_dir/evaluation), plus a
confusion-matrix figure, a gallery of misclassified images and the per-class table to
TensorBoard under model_dir/eval (tags <split>/confusion_matrix, <split>/misclassified).
--eval_crop=F evaluates with another policy instead; the files are then named
<split>-step<N>-crop<F>.* so that they never replace the run's own.
"""
from __future__ import annotations

import os
import sys

from trainer.tools import tool_flags  # noqa: F401  (sets TF_CPP_MIN_LOG_LEVEL first)
from absl import flags  # noqa: E402

from data import check, layout, manifest  # noqa: E402
from trainer.state.run_dir import RunError, SavedRun, read_json  # noqa: E402

PROGRAM = "evaluate"


def define_flags() -> None:
    """The command line's flags, defined only when it runs: trainer.api imports this module
    beside the training flags, which share some names."""
    flags.DEFINE_string("model_dir", None, "The training run directory (config.json, "
                        "classes.json, checkpoints/).")
    flags.DEFINE_string("split", "test", "Split folder of the dataset to evaluate (test, valid, "
                        "...).")
    flags.DEFINE_string("data_dir", None, "Dataset root (default: the run's --data_dir from "
                        "config.json).")
    flags.DEFINE_string("checkpoint", "latest", "latest, best (highest valid accuracy), or a "
                        "checkpoint path (prefix or directory).")
    flags.DEFINE_string("output_dir", None, "Where the JSON and CSV files go (default: "
                        "model_dir/evaluation).")
    flags.DEFINE_integer("batch_size", 0, "Images per batch (0: the run's evaluation batch).",
                         lower_bound=0)
    flags.DEFINE_integer("gallery_size", 24, "Misclassified images shown in the TensorBoard "
                         "gallery.", lower_bound=0)
    flags.DEFINE_enum("tta", "none", ["none", "flip"], "Test-time augmentation: `flip` averages "
                      "the softmax of each image and its mirror (twice the compute); the files "
                      "are named <split>-step<N>-tta-flip.*.")
    flags.DEFINE_float("eval_crop", None, "Evaluation pixels, overriding the run's --eval_crop: "
                       "1 squashes the image to image_size^2; F < 1 resizes the short side to "
                       "floor(image_size/F) and takes the centre crop. The files are then named "
                       "<split>-step<N>-crop<F>.* (default: the run's, unsuffixed).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.register_validator("eval_crop", lambda value: value is None or value > 0,
                             message="--eval_crop must be > 0 and <= 1")
    flags.mark_flag_as_required("model_dir")


FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    tool_flags.reject_positional(argv)
    evaluate_run(FLAGS.model_dir, split=FLAGS.split, data_dir=FLAGS.data_dir,
                 checkpoint=FLAGS.checkpoint, output_dir=FLAGS.output_dir,
                 batch_size=FLAGS.batch_size, gallery_size=FLAGS.gallery_size, tta=FLAGS.tta,
                 eval_crop=FLAGS.eval_crop)
    return 0


def evaluate_run(model_dir: str, *, split: str = "test", data_dir: str | None = None,
                 checkpoint: str = "latest", output_dir: str | None = None,
                 batch_size: int = 0, gallery_size: int = 24, tta: str = "none",
                 eval_crop: float | None = None) -> dict:
    """What `python -m trainer.evaluate` does (see the module doc), with the flags as
    arguments; returns the report written to <split>-step<N>.json and the paths written."""
    if tta not in ("none", "flip"):
        raise tool_flags.ToolError(f"tta={tta!r}: must be none or flip")
    if eval_crop is not None and not 0 < eval_crop <= 1:
        raise tool_flags.ToolError(f"eval_crop={eval_crop}: must be > 0 and <= 1")
    run = SavedRun.load(model_dir)
    data_dir = data_dir or run.config["data_dir"]
    if data_dir.startswith("s3://"):  # the run trained on its synced copy: evaluate that
        bucket, _, prefix = data_dir[len("s3://"):].partition("/")
        data_dir = os.path.join(run.config.get("data_cache_dir") or "dataset", bucket,
                                prefix.strip("/"))
    checkpoint = run.checkpoint_path(checkpoint)  # a bad one is answered before the scan
    files = _split_files(data_dir, run, split)
    tf = tool_flags.import_tensorflow()  # only now: the checks above answer at once

    from trainer.state.checkpoints import restore_model
    from trainer.tools import analysis
    step = run.checkpoint_step(checkpoint)
    model = restore_model(run, checkpoint)
    batch_size = batch_size or run.eval_batch_size
    eval_crop = run.eval_crop if eval_crop is None else float(eval_crop)
    from data import decode, source
    from data.spec import InputSpec
    decode.set_max_pixels(_max_image_pixels(run))  # the run's limit, before anything decodes
    data = source.open_source(data_dir, cache_dir=run.model_dir)
    spec = InputSpec(run.image_size, batch_size, eval_cache="none", eval_crop=eval_crop)
    predictions = analysis.predict_split(
        model, files.files, files.labels, image_size=run.image_size, batch_size=batch_size,
        gallery_size=gallery_size, tta=tta, dataset=data.eval_dataset(files, spec))
    report = analysis.make_report(predictions, run.class_names, split=split, step=step,
                                  checkpoint=checkpoint, data_dir=data_dir, tta=tta,
                                  eval_crop=eval_crop, run_eval_crop=run.eval_crop)
    output_dir = output_dir or os.path.join(run.model_dir, "evaluation")
    writer = tf.summary.create_file_writer(os.path.join(run.model_dir, "eval"))
    paths = analysis.write_report(report, predictions, output_dir, writer)
    writer.close()
    _print_summary(report, run, checkpoint, step, data_dir, split, tta, eval_crop, paths)
    return {**read_json(paths["json"]), "paths": paths}


def _print_summary(report, run, checkpoint, step, data_dir, split, tta, eval_crop, paths):
    from trainer.tools import analysis
    wrong = report.num_images - int(report.per_class["correct"].sum())
    crop = "squashed" if eval_crop == 1.0 else f"centre crop {eval_crop:g}"
    override = "" if eval_crop == run.eval_crop else f", not the run's {run.eval_crop:g}"
    print(f"checkpoint {checkpoint} (step {step}) on {split}: {report.num_images} images "
          f"from {data_dir}, eval pixels {crop} (--eval_crop={eval_crop:g}{override})"
          + (f", test-time augmentation {tta}" if tta != "none" else ""))
    print(f"loss {report.loss:.4f}  top-1 {report.accuracy:.4f}  top-5 {report.top5_accuracy:.4f}"
          f"  ({wrong} misclassified)")
    print("\n".join(analysis.per_class_lines(report)))
    images = [f"{split}/confusion_matrix"] + [f"{split}/misclassified"] * bool(wrong)
    print(f"written: {paths['json']}, {os.path.basename(paths['confusion_csv'])}, "
          f"{os.path.basename(paths['predictions_csv'])}; TensorBoard: {', '.join(images)} "
          f"in {os.path.join(run.model_dir, 'eval')}")


def _max_image_pixels(run: SavedRun) -> int:
    """The run's --max_image_pixels (the default for runs from before the flag)."""
    from data.pixels import DEFAULT_MAX_IMAGE_PIXELS
    return int(run.config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))


def _split_files(data_dir: str, run: SavedRun, split: str) -> layout.SplitFiles:
    """The readable files of --split: from the data check, or a packed folder's manifest."""
    if manifest.is_packed(data_dir):
        packed = manifest.read_manifest(data_dir)
        if packed.class_names != run.class_names:
            raise RunError(f"--data_dir={data_dir}: its classes differ from the run's")
        if split not in packed.splits:
            raise RunError(f"--split={split}: the packed data {data_dir} has no such split")
        manifest.verify_shards(packed, run.model_dir)
        return packed.splits[split]
    # The trainer's data check: unreadable files are left out (and listed), not fatal.
    scanned = check.scan(data_dir, run.class_names,
                         skip_unknown_classes=bool(run.config.get("skip_unknown_classes")),
                         cache_path=check.default_cache_path(data_dir, run.model_dir),
                         max_image_pixels=_max_image_pixels(run))
    if split not in scanned.splits:
        raise RunError(f"--split={split}: {data_dir} has no readable {split}/ split")
    for warning in scanned.report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return scanned.splits[split]


def entry() -> None:
    define_flags()
    tool_flags.run(PROGRAM, main, errors=(RunError, layout.LayoutError, manifest.DataError))


if __name__ == "__main__":
    entry()
