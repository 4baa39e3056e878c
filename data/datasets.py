"""The tf.data datasets for training and evaluation (and synthetic batches).

Both take plain arguments and an optional `tf.distribute.InputContext`, and yield per-replica
batches of ``(uint8 images [B, S, S, 3], int32 labels [B], float32 weights [B])``.

Training order never depends on TensorFlow's global seed or on how many epochs ran before in
this process, so a run resumed at global step k sees exactly the batches an uninterrupted run
would have seen from step k on. Two orders exist:

* random access (`random_access_epochs`), used when any item can be read alone (image files, or
  decoded images held in memory): a function of (seed, epoch) only. Each epoch is a stateless
  permutation of all items, cut into global batches; replica k of the run gets elements
  [k*r, (k+1)*r) of each (r = per-replica batch), and augmentation is seeded by the position in
  the epoch. The global batches are the same whatever the number of workers and replicas, so a
  run resumes on other hardware with the same images; in exchange every input pipeline may need
  any item, so with `cache="memory"` each decodes and keeps all of them.
* grouped (`grouped_epochs`): for data read in blocks (TFRecord shards, disk-cache chunks), a
  function of (seed, epoch, input pipeline): each pipeline owns a fixed shard of the items
  (`items[id::n]`); its blocks are permuted, taken `group_blocks` at a time, and each group's
  items permuted: memory holds a few groups whatever the dataset size, and a resume skips whole
  groups unread (a resume on another number of pipelines gets other batches).

Evaluation visits every image exactly once: the file list is padded to a whole number of global
batches with weight-0 copies, so every replica gets the same number of batches.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from data.augment import Augment, Mix, augment_image, mix_batch
from data.decode import (check_crop_fraction, decode_and_resize, read_and_resize,
                         read_for_eval)
from data.progress import Progress

AUTOTUNE = tf.data.AUTOTUNE


def _pipeline_shard(context: tf.distribute.InputContext | None) -> tuple[int, int, int]:
    """(number of input pipelines, this pipeline's id, replicas this pipeline feeds)."""
    if context is None:
        return 1, 0, 1
    replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
    return context.num_input_pipelines, context.input_pipeline_id, replicas_per_pipeline


def steps_per_epoch(num_files: int, global_batch_size: int) -> int:
    """Training drops the last partial global batch, so every epoch has the same step count."""
    return num_files // global_batch_size


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """How one input pipeline walks the epochs of a run from `start_step`."""
    num_pipelines: int
    pipeline_id: int
    replicas_per_pipeline: int
    per_replica_batch: int
    shard_size: int  # items of this pipeline
    num_items: int  # items of the split (all pipelines)
    epoch_steps: int
    start_step: int
    total_steps: int

    @classmethod
    def make(cls, num_items: int, global_batch_size: int, start_step: int, total_steps: int,
             context: tf.distribute.InputContext | None) -> "EpochPlan":
        num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_shard(context)
        epoch_steps = steps_per_epoch(num_items, global_batch_size)
        if epoch_steps < 1:
            raise ValueError(f"{num_items} training images are fewer than one global batch "
                             f"of {global_batch_size}")
        return cls(num_pipelines, pipeline_id, replicas_per_pipeline,
                   global_batch_size // (num_pipelines * replicas_per_pipeline),
                   len(range(pipeline_id, num_items, num_pipelines)), num_items, epoch_steps,
                   start_step, total_steps)

    @property
    def epoch_images(self) -> int:
        return self.epoch_steps * self.per_replica_batch * self.replicas_per_pipeline

    def epochs(self) -> tf.data.Dataset:
        start_epoch = self.start_step // self.epoch_steps
        return tf.data.Dataset.range(start_epoch, -(-self.total_steps // self.epoch_steps))

    def first(self, epoch: tf.Tensor) -> tf.Tensor:
        """The first position of `epoch` to deliver: where an interrupted run stopped."""
        start_epoch, start_offset = divmod(self.start_step, self.epoch_steps)
        per_pipeline_batch = self.per_replica_batch * self.replicas_per_pipeline
        return tf.where(epoch == start_epoch, tf.constant(start_offset * per_pipeline_batch,
                                                          tf.int64), tf.constant(0, tf.int64))

    def example(self, image, label, epoch_seed, seed_position, index, image_size: int,
                augment: Augment):
        """(augmented image, label, weight 1, item index), augmented by (epoch, position)."""
        op_seed = tf.stack([epoch_seed, tf.cast(seed_position, tf.int64)])
        return (augment_image(image, op_seed, image_size, augment), label,
                tf.ones([], tf.float32), tf.cast(index, tf.int32))


def epoch_order(labels: tf.Tensor, epoch_seed: tf.Tensor, balanced: bool) -> tf.Tensor:
    """The item index at each position of an epoch: a stateless permutation of all items, or
    with `balanced` a class-balanced sample of as many positions (each draws a class uniformly
    among those present, then one of its items uniformly: minority classes repeat, majority
    classes are sampled), both functions of (seed, epoch) only."""
    num_items = tf.size(labels)
    seed = tf.stack([epoch_seed, tf.constant(0, tf.int64)])
    if not balanced:
        return tf.argsort(tf.random.stateless_uniform([num_items], seed))
    by_class = tf.argsort(labels, stable=True)  # item indices grouped by class
    counts = tf.math.bincount(labels)
    starts = tf.cumsum(counts, exclusive=True)
    present = tf.cast(tf.where(counts > 0)[:, 0], tf.int32)
    pick = tf.random.stateless_uniform([num_items], seed + 1, 0, tf.size(present), tf.int32)
    classes = tf.gather(present, pick)
    within = tf.cast(tf.random.stateless_uniform([num_items], seed + 2) *
                     tf.cast(tf.gather(counts, classes), tf.float32), tf.int32)
    within = tf.minimum(within, tf.gather(counts, classes) - 1)
    return tf.gather(by_class, tf.gather(starts, classes) + within)


def random_access_epochs(plan: EpochPlan, seed: int, items: tf.data.Dataset, lookup,
                         labels: tf.Tensor, image_size: int, augment: Augment,
                         balanced: bool = False) -> tf.data.Dataset:
    """This pipeline's examples of each global batch, from `epoch_order` over all items per
    epoch (see the module doc). `items` yields one element holding every item (all decoded
    images, or all paths); `lookup(element, index)` -> uint8 image; `labels`: all labels."""
    per_pipeline_batch = plan.per_replica_batch * plan.replicas_per_pipeline
    global_batch = per_pipeline_batch * plan.num_pipelines
    own = plan.pipeline_id * per_pipeline_batch + tf.range(per_pipeline_batch, dtype=tf.int64)

    def one_epoch(epoch):
        epoch_seed = _epoch_seed(seed, epoch)
        # The epoch's order: a function of (seed, epoch), whatever the global seed.
        order = epoch_order(labels, epoch_seed, balanced)
        steps = tf.range(plan.first(epoch) // per_pipeline_batch, plan.epoch_steps)
        positions = tf.reshape(steps[:, None] * global_batch + own[None, :], [-1])

        def take_epoch(element):
            def prepare(position):
                index = order[position]
                return plan.example(lookup(element, index), tf.gather(labels, index), epoch_seed,
                                    position, index, image_size, augment)
            return tf.data.Dataset.from_tensor_slices(positions).map(
                prepare, num_parallel_calls=AUTOTUNE)
        return items.flat_map(take_epoch)
    return plan.epochs().flat_map(one_epoch)


def grouped_epochs(plan: EpochPlan, seed: int, block_sizes, load_group, labels: tf.Tensor,
                   image_size: int, augment: Augment, group_blocks: int,
                   encoded: bool) -> tf.data.Dataset:
    """Examples read block by block. `block_sizes[b]`: items of block b; `load_group(block ids)`
    -> (images [k] (encoded bytes if `encoded`, else uint8 [k, S, S, 3]), local indices [k]) in
    an order that depends only on the ids. Per epoch the blocks are permuted statelessly, taken
    `group_blocks` at a time, and each group's items permuted; groups before the resume position
    are never read."""
    sizes = np.asarray(block_sizes, np.int64)
    num_groups = -(-len(sizes) // group_blocks)
    padded_sizes = tf.constant(np.append(sizes, 0), tf.int64)

    def one_epoch(epoch):
        epoch_seed = _epoch_seed(seed, epoch)
        perm = tf.argsort(tf.random.stateless_uniform(
            [len(sizes)], tf.stack([epoch_seed, tf.constant(plan.pipeline_id + (1 << 20),
                                                            tf.int64)])))
        groups = tf.reshape(tf.concat([perm, tf.fill([num_groups * group_blocks - len(sizes)],
                                                     len(sizes))], 0), [num_groups, group_blocks])
        ends = tf.cumsum(tf.reduce_sum(tf.gather(padded_sizes, groups), axis=1))
        starts = tf.concat([[0], ends[:-1]], 0)
        first = plan.first(epoch)

        def load(g):
            ids = tf.boolean_mask(groups[g], groups[g] < len(sizes))
            images, local = load_group(ids)
            order = tf.argsort(tf.random.stateless_uniform(
                tf.shape(local), tf.stack([epoch_seed, g + (1 << 40)])))
            positions = starts[g] + tf.range(tf.size(local, out_type=tf.int64))
            return tf.gather(images, order), tf.gather(local, order), positions

        def prepare(image, index, position):
            if encoded:
                image = decode_and_resize(image, image_size)
            # Shard item i of pipeline p of n is item i * n + p of the split.
            return plan.example(image, tf.gather(labels, index), epoch_seed,
                                position * plan.num_pipelines + plan.pipeline_id,
                                index * plan.num_pipelines + plan.pipeline_id, image_size,
                                augment)
        ds = tf.data.Dataset.range(num_groups).filter(
            lambda g: (ends[g] > first) & (starts[g] < plan.epoch_images))
        ds = ds.map(load, num_parallel_calls=2, deterministic=True).unbatch()
        ds = ds.filter(lambda i, x, p: (p >= first) & (p < plan.epoch_images))
        return ds.map(prepare, num_parallel_calls=AUTOTUNE)
    return plan.epochs().flat_map(one_epoch)


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


def train_dataset(files, labels, *, image_size: int, global_batch_size: int, seed: int,
                  start_step: int, total_steps: int, augment: Augment = Augment(),
                  cache="memory", context: tf.distribute.InputContext | None = None,
                  mix: Mix | None = None, cache_dir: str | None = None,
                  log=None, with_ids: bool = False, balanced: bool = False) -> tf.data.Dataset:
    """Per-replica training batches (images, labels, weights) of image files for global steps
    [start_step, total_steps); with an enabled `mix`, float32 images and soft labels
    [B, classes]; `with_ids` adds each image's index in `files` (int32 [B]); `balanced`: the
    class-balanced order of `epoch_order` (not with the disk cache). `cache`: "memory"
    (decode every file once into one uint8 tensor), "none" (decode every time), "disk" (this
    pipeline's share decoded into chunks under `cache_dir`, see data/diskcache.py)."""
    plan = EpochPlan.make(len(files), global_batch_size, start_step, total_steps, context)
    mode = cache_mode(cache)
    if mode == "disk":
        if balanced:
            raise ValueError("balanced sampling needs --cache_images=memory or none (the disk "
                             "cache is read in blocks)")
        from data import diskcache
        shard_files = list(files)[plan.pipeline_id::plan.num_pipelines]
        shard_labels = tf.constant(list(labels)[plan.pipeline_id::plan.num_pipelines], tf.int32)
        chunks = diskcache.for_files(cache_dir, shard_files, image_size, log=log)
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
                                  balanced)
    else:
        ds = random_access_epochs(plan, seed, tf.data.Dataset.from_tensors(list(files)),
                                  lambda paths, i: read_and_resize(paths[i], image_size),
                                  tf.constant(list(labels), tf.int32), image_size, augment,
                                  balanced)
    return batch_and_mix(ds, plan, seed=seed, mix=mix, with_ids=with_ids)


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


def eval_dataset(files, labels, *, image_size: int, global_batch_size: int, cache="memory",
                 context: tf.distribute.InputContext | None = None,
                 eval_crop: float = 1.0) -> tf.data.Dataset:
    """Every image once, in file order, padded with weight-0 copies to whole global batches;
    pixels of data.decode.decode_for_eval with `eval_crop` (1: squashed, F < 1: centre crop)."""
    eval_crop = check_crop_fraction(eval_crop)
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_shard(context)
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
    if cache_mode(cache) == "memory":  # disk: eval sets are small, streamed
        ds = ds.cache()
    return ds.batch(per_replica_batch, drop_remainder=True).prefetch(AUTOTUNE)


class FolderSource:
    """Image files in class folders (see data/source.py for the packed kind)."""
    kind = "folder"

    def __init__(self, data_dir: str):
        self.data_dir = data_dir

    def train_dataset(self, split, **kwargs) -> tf.data.Dataset:
        return train_dataset(split.files, split.labels, **kwargs)

    def eval_dataset(self, split, **kwargs) -> tf.data.Dataset:
        return eval_dataset(split.files, split.labels, **kwargs)

    @staticmethod
    def disk_cache_name(split, image_size: int, num_pipelines: int, pipeline_id: int) -> str:
        """The disk cache folder name (under CACHE_DIR/decoded) of one pipeline's share."""
        from data import diskcache
        return diskcache.folder_name(list(split.files)[pipeline_id::num_pipelines], image_size)


def synthetic_dataset(*, image_size: int, num_classes: int, global_batch_size: int, seed: int,
                      num_steps: int, context: tf.distribute.InputContext | None = None
                      ) -> tf.data.Dataset:
    """One random uint8 batch per replica, repeated from memory: the model's compute ceiling
    without file reading or decoding (for measuring a host without its data)."""
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_shard(context)
    per_replica_batch = global_batch_size // (num_pipelines * replicas_per_pipeline)
    batch_seed = tf.constant([seed, pipeline_id], tf.int64)
    images = tf.cast(tf.random.stateless_uniform(
        [per_replica_batch, image_size, image_size, 3], batch_seed, maxval=256, dtype=tf.int32),
        tf.uint8)
    labels = tf.random.stateless_uniform([per_replica_batch], batch_seed + 1, maxval=num_classes,
                                         dtype=tf.int32)
    weights = tf.ones([per_replica_batch], tf.float32)
    ds = tf.data.Dataset.from_tensors((images, labels, weights)).repeat()
    return ds.take(num_steps * replicas_per_pipeline).prefetch(AUTOTUNE)
