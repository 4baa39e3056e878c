"""The trainer package: flags, config, strategy, step, outer loop and command-line entries."""
import os

# TensorFlow's C++ INFO/WARNING lines drown the one-line-per-loop console; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
