"""The epoch orders of training: which item each global batch position holds, per epoch.

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
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from data.augment import Augment, augment_image
from data.decode import decode_and_resize

AUTOTUNE = tf.data.AUTOTUNE


def pipeline_shard(context: tf.distribute.InputContext | None) -> tuple[int, int, int]:
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
        num_pipelines, pipeline_id, replicas_per_pipeline = pipeline_shard(context)
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
