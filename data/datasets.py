"""The tf.data datasets of image folders (FolderSource) and of random images (SyntheticSource).

Both take an InputSpec (data/spec.py) and an optional `tf.distribute.InputContext`, and yield
per-replica batches of ``(uint8 images [B, S, S, 3], int32 labels [B], float32 weights [B])``.

The orders of training epochs (random access, grouped) are data/orders.py.

Evaluation visits every image exactly once: the file list is padded to a whole number of global
batches with weight-0 copies, so every replica gets the same number of batches.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from data.augment import Mix, mix_batch
from data.decode import check_crop_fraction, read_and_resize, read_for_eval
from data.orders import EpochPlan, grouped_epochs, pipeline_shard, random_access_epochs
from data.progress import Progress
from data.spec import InputSpec

AUTOTUNE = tf.data.AUTOTUNE


def cache_mode(cache) -> str:
    """"memory", "disk" or "none" (True and False, the old boolean flag, mean memory and none)."""
    mode = {True: "memory", False: "none"}.get(cache, cache)
    if mode not in ("memory", "disk", "none"):
        raise ValueError(f"cache must be memory, disk or none, not {cache!r}")
    return mode


# The decoded training set of this process (see `decoded_in_memory`): a restarted input (a
# rollback, a second dataset over the same files) reuses it instead of decoding again.
_IN_MEMORY: dict = {}


def decoded_in_memory(key, num_items: int, image_size: int, make_stream, log=None) -> tf.Tensor:
    """Every item decoded into one uint8 tensor [num_items, S, S, 3] that holds each image
    once: `make_stream()` yields (uint8 images [k, S, S, 3], int64 item indices [k]) batches,
    copied into a 64-byte aligned numpy array as they come, which TensorFlow then takes without
    a copy (DLPack). (tf.data's `batch(N).cache()` held every image twice while it
    concatenated: 2 x 12.6 GB for the birds set.) Kept for the process under `key`."""
    if _IN_MEMORY.get("key") == key:
        return _IN_MEMORY["images"]
    _IN_MEMORY.clear()  # the previous set first: never two in memory
    size = num_items * image_size * image_size * 3
    raw = np.empty(size + 64, np.uint8)
    offset = -raw.ctypes.data % 64  # TensorFlow's alignment, else it copies
    images = raw[offset:offset + size].reshape(num_items, image_size, image_size, 3)
    progress = Progress("memory cache", num_items, log)
    for batch, indices in make_stream().as_numpy_iterator():
        images[indices] = batch
        progress.update(len(indices))
    progress.close()
    tensor = tf.experimental.dlpack.from_dlpack(images.__dlpack__())
    _IN_MEMORY.update(key=key, images=tensor)
    return tensor


def train_dataset(files, labels, spec: InputSpec,
                  context: tf.distribute.InputContext | None = None, *, start_step: int = 0,
                  total_steps: int, log=None) -> tf.data.Dataset:
    """Per-replica training batches (images, labels, weights) of image files for global steps
    [start_step, total_steps); with an enabled `spec.mix`, float32 images and soft labels
    [B, classes]; `spec.with_ids` adds each image's index in `files` (int32 [B]);
    `spec.balanced`: the class-balanced order of data.orders.epoch_order (not with the disk
    cache). `spec.cache`: "memory" (decode every file once into one uint8 tensor), "none"
    (decode every time), "disk" (this pipeline's share decoded into chunks under
    `spec.cache_dir`, see data/diskcache.py). `log`: the caches' progress lines."""
    image_size, seed, augment = spec.image_size, spec.seed, spec.augment
    plan = EpochPlan.make(len(files), spec.global_batch_size, start_step, total_steps, context)
    mode = cache_mode(spec.cache)
    if mode == "disk":
        if spec.balanced:
            raise ValueError("balanced sampling needs --cache_images=memory or none (the disk "
                             "cache is read in blocks)")
        from data import diskcache
        shard_files = list(files)[plan.pipeline_id::plan.num_pipelines]
        shard_labels = tf.constant(list(labels)[plan.pipeline_id::plan.num_pipelines], tf.int32)
        chunks = diskcache.for_files(spec.cache_dir, shard_files, image_size, log=log)
        ds = grouped_epochs(plan, seed, chunks.sizes, chunks.load_group, shard_labels,
                            image_size, augment, diskcache.GROUP_CHUNKS, encoded=False)
    elif mode == "memory":
        # Decoded once into one uint8 tensor [files, S, S, 3] (1/4 of float32); epochs gather
        # from it by index.
        def make_stream():
            decoded = tf.data.Dataset.from_tensor_slices(list(files)).map(
                lambda path: read_and_resize(path, image_size), num_parallel_calls=AUTOTUNE)
            return tf.data.Dataset.zip(decoded, tf.data.Dataset.range(len(files))).batch(64)
        images = decoded_in_memory(("files", tuple(files)), len(files), image_size, make_stream,
                                   log)
        ds = random_access_epochs(plan, seed, tf.data.Dataset.from_tensors(images),
                                  lambda all_images, i: all_images[i],
                                  tf.constant(list(labels), tf.int32), image_size, augment,
                                  spec.balanced)
    else:
        ds = random_access_epochs(plan, seed, tf.data.Dataset.from_tensors(list(files)),
                                  lambda paths, i: read_and_resize(paths[i], image_size),
                                  tf.constant(list(labels), tf.int32), image_size, augment,
                                  spec.balanced)
    return batch_and_mix(ds, plan, seed=seed, mix=spec.mix, with_ids=spec.with_ids)


def batch_and_mix(ds: tf.data.Dataset, plan: EpochPlan, *, seed: int, mix: Mix | None,
                  with_ids: bool = False) -> tf.data.Dataset:
    """Examples from `start_step` on -> per-replica batches up to `total_steps`, mixed by an
    enabled `mix` (seeded by the batch's global replica-batch number, step * replicas +
    replica: the same for a resumed run on the same replicas); item ids kept with `with_ids`."""
    replicas_per_pipeline, start_step = plan.replicas_per_pipeline, plan.start_step
    ds = ds.batch(plan.per_replica_batch, drop_remainder=True)
    ds = ds.take((plan.total_steps - start_step) * replicas_per_pipeline)
    if mix is not None and mix.enabled:
        mix_seed = tf.constant([seed, 0x6D6978], tf.int64)
        replicas = plan.num_pipelines * replicas_per_pipeline

        def mix_one(index, batch):
            images, batch_labels, weights, ids = batch
            step, local = index // replicas_per_pipeline, index % replicas_per_pipeline
            number = step * replicas + plan.pipeline_id * replicas_per_pipeline + local
            images, soft = mix_batch(images, batch_labels,
                                     tf.random.experimental.stateless_fold_in(mix_seed, number),
                                     mix)
            return images, soft, weights, ids
        ds = ds.enumerate(start=start_step * replicas_per_pipeline).map(
            mix_one, num_parallel_calls=AUTOTUNE)
    if not with_ids:
        ds = ds.map(lambda images, labels, weights, ids: (images, labels, weights))
    return ds.prefetch(AUTOTUNE)


def eval_dataset(files, labels, spec: InputSpec,
                 context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Every image once, in file order, padded with weight-0 copies to whole global batches of
    `spec.eval_batch_size`; pixels of data.decode.decode_for_eval with `spec.eval_crop` (1:
    squashed, F < 1: centre crop); kept decoded after the first pass with eval_cache memory."""
    eval_crop, image_size = check_crop_fraction(spec.eval_crop), spec.image_size
    global_batch_size = spec.eval_batch_size
    num_pipelines, pipeline_id, replicas_per_pipeline = pipeline_shard(context)
    per_replica_batch = global_batch_size // (num_pipelines * replicas_per_pipeline)
    files, labels = list(files), list(labels)
    padded = -(-len(files) // global_batch_size) * global_batch_size
    pad = padded - len(files)
    weights = [1.0] * len(files) + [0.0] * pad
    files = files + files[:1] * pad
    labels = labels + labels[:1] * pad
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(files), tf.constant(labels, tf.int32), tf.constant(weights, tf.float32)))
    ds = ds.shard(num_pipelines, pipeline_id)
    ds = ds.map(lambda p, y, w: (read_for_eval(p, image_size, eval_crop), y, w),
                num_parallel_calls=AUTOTUNE)
    if cache_mode(spec.eval_cache) == "memory":  # disk: eval sets are small, streamed
        ds = ds.cache()
    return ds.batch(per_replica_batch, drop_remainder=True).prefetch(AUTOTUNE)


class FolderSource:
    """Image files in class folders (data/source.py has the interface)."""
    kind = "folder"
    balanced_cache_modes = ("memory", "none")  # balanced epochs read images one by one

    def __init__(self, data_dir: str):
        self.data_dir = data_dir

    def train_dataset(self, split, spec: InputSpec, context=None, *, start_step: int = 0,
                      total_steps: int, log=None) -> tf.data.Dataset:
        return train_dataset(split.files, split.labels, spec, context, start_step=start_step,
                             total_steps=total_steps, log=log)

    def eval_dataset(self, split, spec: InputSpec, context=None) -> tf.data.Dataset:
        # By keyword: tests/finish_probe.py wraps eval_dataset(files, labels, **kwargs).
        return eval_dataset(split.files, split.labels, spec=spec, context=context)

    @staticmethod
    def disk_cache_name(split, image_size: int, num_pipelines: int, pipeline_id: int) -> str:
        """The disk cache folder name (under CACHE_DIR/decoded) of one pipeline's share."""
        from data import diskcache
        return diskcache.folder_name(list(split.files)[pipeline_id::num_pipelines], image_size)


def _random_batch(image_size: int, per_replica_batch: int, num_classes: int, seed: int,
                  pipeline_id: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One pipeline's random (uint8 images, int32 labels), a function of (seed, pipeline)."""
    batch_seed = tf.constant([seed, pipeline_id], tf.int64)
    images = tf.cast(tf.random.stateless_uniform(
        [per_replica_batch, image_size, image_size, 3], batch_seed, maxval=256, dtype=tf.int32),
        tf.uint8)
    labels = tf.random.stateless_uniform([per_replica_batch], batch_seed + 1, maxval=num_classes,
                                         dtype=tf.int32)
    return images, labels


class SyntheticSource:
    """One random uint8 batch per replica, repeated from memory: the model's compute ceiling
    without file reading or decoding (for measuring a host without its data). Of the spec only
    the sizes and the seed count (no augmentation, mixing or item ids: what is measured is the
    step alone). Its splits have no files; evaluation gives the batches a split of that many
    items would."""
    kind = "synthetic"
    balanced_cache_modes = ("none",)
    data_dir = None

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def train_dataset(self, split, spec: InputSpec, context=None, *, start_step: int = 0,
                      total_steps: int, log=None) -> tf.data.Dataset:
        num_pipelines, pipeline_id, replicas_per_pipeline = pipeline_shard(context)
        per_replica_batch = spec.global_batch_size // (num_pipelines * replicas_per_pipeline)
        images, labels = _random_batch(spec.image_size, per_replica_batch, self.num_classes,
                                       spec.seed, pipeline_id)
        weights = tf.ones([per_replica_batch], tf.float32)
        ds = tf.data.Dataset.from_tensors((images, labels, weights)).repeat()
        return ds.take((total_steps - start_step) * replicas_per_pipeline).prefetch(AUTOTUNE)

    def eval_dataset(self, split, spec: InputSpec, context=None) -> tf.data.Dataset:
        """The random batch for every batch of `split` (its items, as a folder's: this
        pipeline's are positions id, id+n, ...), weight 0 past its end."""
        num_pipelines, pipeline_id, replicas_per_pipeline = pipeline_shard(context)
        per_replica_batch = spec.eval_batch_size // (num_pipelines * replicas_per_pipeline)
        images, labels = _random_batch(spec.image_size, per_replica_batch, self.num_classes,
                                       spec.seed, pipeline_id)
        padded = -(-len(split) // spec.eval_batch_size) * spec.eval_batch_size
        weights = tf.cast(tf.range(pipeline_id, padded, num_pipelines) < len(split), tf.float32)
        return tf.data.Dataset.from_tensor_slices(weights).batch(
            per_replica_batch, drop_remainder=True).map(lambda w: (images, labels, w))

    @staticmethod
    def disk_cache_name(split, image_size: int, num_pipelines: int, pipeline_id: int) -> str:
        return ""  # never cached: nothing is decoded
