"""The model zoo; no absl flags here."""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # why: trainer/__init__.py
