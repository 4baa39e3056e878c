"""Shared plumbing of the tools (trainer.evaluate, trainer.export, trainer.predict).

Each tool is its own program and defines its own absl flags in its module; this module defines
none (and never imports trainer/flags.py, whose required training flags would break the tools).
"""
from __future__ import annotations

import os
import sys
from typing import Callable

# The tools print their own results; TensorFlow's C++ INFO/WARNING lines would bury them (and
# a user error must be one line). Set before TensorFlow is imported; an explicit value wins.
# (trainer/__init__.py sets the same default.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_QUIET = os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"

from absl import app, flags, logging  # noqa: E402


def import_tensorflow():
    """Import TensorFlow; unless TF_CPP_MIN_LOG_LEVEL=0 (all logs wanted), with stderr closed
    meanwhile: the C++ runtime prints lines at import (e.g. "oneDNN custom operations are on")
    that TF_CPP_MIN_LOG_LEVEL does not silence. A failed import still raises as usual."""
    if not _QUIET or "tensorflow" in sys.modules:
        import tensorflow as tf
        return tf
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    return tf


class ToolError(ValueError):
    """A user error; str() is the one-line message printed as `<program>: <message>`."""


def reject_positional(argv: list[str]) -> None:
    """These tools take flags only; a stray word is a user error, not something to ignore."""
    if len(argv) > 1:
        raise ToolError(f"unexpected arguments {argv[1:]} (flags look like --name=value)")


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """absl's parser, but a bad flag is one line on stderr and exit code 2."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"{program}: flag error: {message}", file=sys.stderr)
            sys.exit(2)
    return parse


def run(program: str, main: Callable[[list[str]], int], errors: tuple = ()) -> None:
    """app.run(main) where ToolError and the exception types in `errors` become one line on
    stderr and exit code 1."""
    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            code = main(argv)
        except (ToolError, *errors) as e:
            print(f"{program}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
            code = 1
        sys.exit(code)
    app.run(wrapped, flags_parser=flags_parser(program))
