"""Where training data comes from: a folder of images, a packed folder (data/pack.py) or random
images; one interface for the three.

    source = open_source(data_dir)                    # FolderSource or PackedSource
    source = open_source(None, synthetic=True, num_classes=10)        # SyntheticSource
    spec = InputSpec(image_size=224, global_batch_size=256, ...)     # data/spec.py
    source.train_dataset(split_files, spec, context, start_step=k, total_steps=n, log=print)
    source.eval_dataset(split_files, spec, context)

A packed folder is the one with a manifest (data/manifest.py, TensorFlow-free). Every source
yields per-replica batches of (uint8 images [B, S, S, 3], int32 labels [B], float32 weights
[B]) (with an enabled `spec.mix`, float32 images and soft labels; with `spec.with_ids`, item
indices after the weights).

The folder and packed sources give the same items for a split: `layout.SplitFiles` whose files
are, for a folder, the readable image paths the data check kept and, for packed data, the same
paths relative to the packed data's source folder, in the same order, with the same labels.
"""
from __future__ import annotations

from typing import Protocol

import tensorflow as tf

from data import manifest
from data.datasets import FolderSource, SyntheticSource
from data.layout import SplitFiles
from data.packed import PackedSource
from data.spec import InputSpec


class Source(Protocol):
    kind: str  # folder, packed or synthetic
    data_dir: str | None
    balanced_cache_modes: tuple[str, ...]  # the cache modes that can serve balanced epochs

    def train_dataset(self, split: SplitFiles, spec: InputSpec,
                      context: tf.distribute.InputContext | None = None, *,
                      start_step: int = 0, total_steps: int, log=None) -> tf.data.Dataset:
        """Training batches of global steps [start_step, total_steps)."""

    def eval_dataset(self, split: SplitFiles, spec: InputSpec,
                     context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        """Every item of `split` once, weight-0 padded to whole global evaluation batches."""

    def disk_cache_name(self, split: SplitFiles, image_size: int, num_pipelines: int,
                        pipeline_id: int) -> str:
        """The disk cache folder (under CACHE_DIR/decoded) of one pipeline's share."""


def open_source(data_dir: str | None, *, synthetic: bool = False, num_classes: int = 0,
                cache_dir: str | None = None, log=None) -> Source:
    """The source of `data_dir`: PackedSource (manifest read, shards verified; a bad shard is
    manifest.DataError) or FolderSource; with `synthetic`, random images of `num_classes`."""
    if synthetic:
        return SyntheticSource(num_classes)
    if manifest.is_packed(data_dir):
        packed = manifest.read_manifest(data_dir)
        manifest.verify_shards(packed, cache_dir, log)
        return PackedSource(packed)
    return FolderSource(data_dir)
