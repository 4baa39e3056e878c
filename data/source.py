"""Where training data comes from: a folder of images or a packed folder (data/pack.py).

    source = open_source(data_dir)        # FolderSource or PackedSource, by the manifest
    source.train_dataset(split_files, image_size=..., ..., cache="memory"|"disk"|"none",
                         cache_dir=..., context=...)
    source.eval_dataset(split_files, image_size=..., global_batch_size=..., cache=..., context=...,
                        eval_crop=F)      # pixels of data.decode.decode_for_eval

A packed folder is the one with a manifest (data/manifest.py, TensorFlow-free).

Both sources give the same items for a split: `layout.SplitFiles` whose files are, for a folder,
the readable image paths the data check kept and, for packed data, the same paths relative to
the packed data's source folder, in the same order, with the same labels.
"""
from __future__ import annotations

from data import manifest


def open_source(data_dir: str, cache_dir: str | None = None, log=None):
    """The source of `data_dir`: PackedSource (manifest read, shards verified) or FolderSource."""
    if manifest.is_packed(data_dir):
        packed = manifest.read_manifest(data_dir)
        manifest.verify_shards(packed, cache_dir, log)
        from data.packed import PackedSource
        return PackedSource(packed)
    from data.datasets import FolderSource
    return FolderSource(data_dir)
