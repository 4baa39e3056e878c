"""Benchmarks a person runs and reads: speed (run.py), the reference job's data size (scale.py),
the cost of resuming (resume_cost.py) and whether fine-tuning pays (transfer.py)."""
import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (`prog: message`, exit code 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


class TrainerFailed(RuntimeError):
    """The trainer process exited non-zero; str() is one line, `output` its whole stderr (or
    stdout when stderr is empty)."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def run_trainer(model_dir: str, flags: list[str]) -> tuple[dict, str]:
    """`python -m trainer.main --model_dir=MODEL_DIR FLAGS` in its own process, as a user runs
    it; returns the run's results.json and the console output."""
    import json
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "trainer.main", f"--model_dir={model_dir}",
                             *flags], capture_output=True, text=True)
    if result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        last = output.splitlines()[-1] if output else "no output"
        raise TrainerFailed(f"the trainer exited {result.returncode} for {model_dir}: {last}",
                            output)
    with open(os.path.join(model_dir, "results.json")) as f:
        return json.load(f), result.stdout
