"""What a run's datasets are made of besides the items: one `InputSpec`, built once by the
trainer from its flags (trainer/loop/inputs.py) and given to every source of data/source.py.

Plain values only, so that data/ never reads a flag: the same spec gives the same batches from
an image folder, its packed copy (with the memory cache) or a tool that builds its own.
"""
from __future__ import annotations

import dataclasses

from data.augment import Augment, Mix


@dataclasses.dataclass(frozen=True)
class InputSpec:
    image_size: int
    global_batch_size: int  # training; the whole step over every replica
    seed: int = 0  # the epoch orders, augmentation and mixing (data/orders.py)
    augment: Augment = Augment()
    mix: Mix | None = None  # an enabled Mix: float32 images and soft labels [B, classes]
    balanced: bool = False  # class-balanced epochs (data.orders.epoch_order)
    with_ids: bool = False  # training batches also carry each image's item index (int32 [B])
    cache: str = "memory"  # where decoded training images live: memory, disk or none
    cache_dir: str | None = None  # the disk cache's folder (data/diskcache.py)
    eval_global_batch_size: int = 0  # 0: global_batch_size
    eval_cache: str = "memory"  # memory: evaluation images kept decoded after the first pass
    eval_crop: float = 1.0  # evaluation pixels (data.decode.decode_for_eval)

    @property
    def eval_batch_size(self) -> int:
        """The global batch of evaluation."""
        return self.eval_global_batch_size or self.global_batch_size
