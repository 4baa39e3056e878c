"""Classify image files with an exported model:

    python -m trainer.predict --export_dir=DIR IMAGE_OR_FOLDER... [--format=table|json|csv]
                              [--top_k=5]

--export_dir is a version folder (holding saved_model.pb) or the folder of versions
(model_dir/export), in which case the highest version is used. Folders are searched recursively
for image files (.jpg .jpeg .png .gif .bmp). The results go to stdout; a file that cannot be
read or decoded gets a line of its own on stderr and the others go on (exit code 1 if any file
failed, else 0). The export's signature decodes each image itself, with the training run's
--eval_crop (data.decode.decode_for_eval): the pixels of the run's evaluations.
"""
from __future__ import annotations

import csv
import json
import os
import sys

from trainer.tools import tool_flags
from absl import flags  # noqa: E402

from data import layout  # noqa: E402

PROGRAM = "predict"

def define_flags() -> None:
    """The command line's flags, defined only when it runs: trainer.api imports this module
    beside the training flags, which share some names."""
    flags.DEFINE_string("export_dir", None, "An export version folder, or model_dir/export (the "
                        "highest version is used).")
    flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "Output format.")
    flags.DEFINE_integer("top_k", 5, "Classes per image (at most what the export returns).",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Images per call of the model.", lower_bound=1)
    flags.mark_flag_as_required("export_dir")


FLAGS = flags.FLAGS


def list_inputs(args: list[str]) -> list[tuple[str, str | None]]:
    """(path, error or None) for each file named or found in a named folder, in order."""
    found = []
    for arg in args:
        if os.path.isdir(arg):
            files = []
            for root, dirs, names in os.walk(arg):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in names if layout.is_image_file(n)]
            if not files:
                found.append((arg, "folder holds no image files"))
            found += [(path, None) for path in sorted(files)]
        elif os.path.exists(arg):
            found.append((arg, None))
        else:
            found.append((arg, "no such file or folder"))
    return found


def _read(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"


class Classifier:
    def __init__(self, export_dir: str, top_k: int | None = None):
        import tensorflow as tf
        self.tf = tf
        self.export_dir = export_dir
        self.signature = tf.saved_model.load(export_dir).signatures["serving_default"]
        self.k = int(self.signature.structured_outputs["classes"].shape[-1])
        self.top_k = min(top_k or self.k, self.k)  # classes reported per image

    @classmethod
    def open(cls, export_dir: str, top_k: int = 5, strict_top_k: bool = False) -> "Classifier":
        """The export in `export_dir` (a version folder, or the folder of versions: the
        highest); `strict_top_k`: refuse a top_k above what the export returns."""
        tool_flags.import_tensorflow()
        from trainer.tools import serving
        try:
            export_dir = serving.resolve_export_dir(export_dir)
        except serving.ExportError as e:
            raise tool_flags.ToolError(str(e)) from None
        classifier = cls(export_dir, top_k)
        if top_k > classifier.k and strict_top_k:
            raise tool_flags.ToolError(f"--top_k={top_k}: the export {export_dir} returns the "
                                       f"top {classifier.k} classes only (export again with "
                                       f"--top_k)")
        return classifier

    def __call__(self, contents: list[bytes]) -> list[list[tuple[str, float]] | None]:
        """Top-k per image; None for an image that does not decode."""
        tf = self.tf
        try:
            out = self.signature(images=tf.constant(contents, tf.string))
        except tf.errors.InvalidArgumentError:
            if len(contents) == 1:
                return [None]
            return [result for data in contents for result in self([data])]
        names, probabilities = out["classes"].numpy(), out["probabilities"].numpy()
        return [[(n.decode("utf-8"), float(p)) for n, p in zip(row_names, row_probabilities)]
                for row_names, row_probabilities in zip(names, probabilities)]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise tool_flags.ToolError("give one or more image files or folders after the flags")
    classifier = Classifier.open(FLAGS.export_dir, FLAGS.top_k,
                                 strict_top_k=FLAGS["top_k"].present)
    output = Output(FLAGS.format, classifier.top_k)
    failures = 0
    for path, top, error in classify(classifier, argv[1:], batch_size=FLAGS.batch_size):
        if error is not None:
            failures += 1
            _report(path, error)
        else:
            output.add(path, top)
    output.finish()
    return 1 if failures else 0


def classify(classifier: "Classifier", inputs: list[str], *, batch_size: int = 32):
    """(path, top-k [(class, probability)] or None, error or None) for every image file named
    or found in a named folder, in order."""
    k = classifier.top_k
    pending: list[tuple[str, bytes]] = []

    def flush():
        results = classifier([data for _, data in pending]) if pending else []
        done = [(path, result[:k], None) if result is not None else
                (path, None, "not a decodable image (JPEG, PNG, GIF or BMP)")
                for (path, _), result in zip(pending, results)]
        pending.clear()
        return done

    for path, error in list_inputs(inputs):
        data = None
        if error is None:
            data, error = _read(path)
        if error is not None:
            yield from flush()  # keep the output in input order
            yield path, None, error
            continue
        pending.append((path, data))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def _report(path: str, message: str) -> None:
    sys.stdout.flush()
    print(f"{PROGRAM}: {path}: {message}", file=sys.stderr, flush=True)


class Output:
    """Writes results as they come (table, csv) or at the end (json)."""

    def __init__(self, kind: str, k: int):
        self.kind, self.k = kind, k
        self.records = []
        if kind == "csv":
            self.csv = csv.writer(sys.stdout, lineterminator="\n")
            header = ["file"]
            for i in range(1, k + 1):
                header += [f"class_{i}", f"probability_{i}"]
            self.csv.writerow(header)

    def add(self, path: str, top: list[tuple[str, float]]) -> None:
        if self.kind == "table":
            cells = "  ".join(f"{name} {p:.4f}" for name, p in top)
            print(f"{path}  {cells}", flush=True)
        elif self.kind == "csv":
            row = [path]
            for name, p in top:
                row += [name, f"{p:.6f}"]
            self.csv.writerow(row)
            sys.stdout.flush()
        else:
            self.records.append({"file": path, "predictions": [
                {"class": name, "probability": p} for name, p in top]})

    def finish(self) -> None:
        if self.kind == "json":
            print(json.dumps(self.records, indent=1))


def entry() -> None:
    define_flags()
    tool_flags.run(PROGRAM, main)


if __name__ == "__main__":
    entry()
