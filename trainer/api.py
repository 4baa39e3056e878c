"""The Python API: the runs of `python -m trainer.main` from a notebook or a script.

    from trainer import api
    config = api.make_config(flagfile="configs/demo.cfg", model_dir="runs/nb", epochs=5)
    results = api.train(config)                      # the dict written to results.json
    report = api.evaluate("runs/nb", split="test")   # as python -m trainer.evaluate
    path = api.export("runs/nb", version=99)         # as python -m trainer.export
    rows = api.predict(path, ["photo.jpg"])          # as python -m trainer.predict

`make_config` validates with the command line's own rules (trainer/flags.py: the flags are the
command-line front of the same Config, not a second implementation), and raises ConfigError
with the same one-line message instead of exiting. `train` raises the trainer's one-line errors
(TrainingError, LayoutError, RunError, ...) and Preempted after a stop signal (the checkpoint is saved:
call it again to resume). In a notebook the loop's progress is a progress bar (tqdm.auto).
"""
from __future__ import annotations

from trainer.config import Config


class ConfigError(ValueError):
    """A flag value that breaks a rule; str() is the command line's one-line message."""


def _argument(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"--{name}={value}"


def make_config(flagfile: str | None = None, **flags) -> Config:
    """The Config of `--flagfile=FLAGFILE` (optional) with `flags` given after it (names as on
    the command line: model_dir="runs/x", random_flip=False, allow_change=["seed"])."""
    from absl import flags as absl_flags

    from trainer import flags as trainer_flags
    argv = ([f"--flagfile={flagfile}"] if flagfile else []) + \
        [_argument(name, value) for name, value in flags.items()]
    try:
        return trainer_flags.config_from_argv(argv)
    except absl_flags.Error as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(message.removeprefix("ERROR:: ")) from None


def train(config: Config) -> dict:
    """Train (or resume, or finish) the run of `config`; returns its results.json dict."""
    from trainer.state.run_dir import check_run_folder
    check_run_folder(config.model_dir)  # a folder of another project: RunError, nothing written
    from trainer.tools.tool_flags import import_tensorflow
    import_tensorflow()
    from trainer.loop.train import run
    return run(config)


def evaluate(model_dir: str, **options) -> dict:
    """`python -m trainer.evaluate` (options: split, data_dir, checkpoint, output_dir,
    batch_size, gallery_size, tta, eval_crop); returns the report and the files written."""
    from trainer.evaluate import evaluate_run
    return evaluate_run(model_dir, **options)


def export(model_dir: str, **options) -> str:
    """`python -m trainer.export` (options: checkpoint, format, version, export_root, top_k,
    overwrite, temperature, unknown_below); returns the version folder written."""
    from trainer.export import export_run
    return export_run(model_dir, **options)


def predict(export_dir: str, images: list[str], *, top_k: int = 5,
            batch_size: int = 32) -> list[dict]:
    """`python -m trainer.predict`: for each image file (or every image in a folder), in order,
    {"file", "predictions": [{"class", "probability"}...]} or {"file", "error"}."""
    from trainer.predict import Classifier, classify
    classifier = Classifier.open(export_dir, top_k)
    return [{"file": path, "error": error} if error else
            {"file": path, "predictions": [{"class": name, "probability": p} for name, p in top]}
            for path, top, error in classify(classifier, list(images), batch_size=batch_size)]
