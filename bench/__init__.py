"""Benchmarks a person runs and reads: speed (run.py), the cost of resuming (resume_cost.py) and
whether fine-tuning pays (transfer.py)."""
import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (`prog: message`, exit code 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")
