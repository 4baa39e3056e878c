"""The tf.data datasets for training and evaluation (and synthetic batches).

Both take plain arguments and an optional `tf.distribute.InputContext`, and yield per-replica
batches of ``(uint8 images [B, S, S, 3], int32 labels [B], float32 weights [B])``.

Training order is a pure function of (seed, epoch, input pipeline): each pipeline owns a fixed
shard of the files and visits it in a stateless random permutation of (seed, epoch, pipeline);
augmentation uses stateless random ops seeded by (seed, epoch, position). Neither depends on
TensorFlow's global seed or on how many epochs ran before in this process. A run resumed at global step k therefore
sees exactly the batches an uninterrupted run would have seen from step k on.

Evaluation visits every image exactly once: the file list is padded to a whole number of global
batches with weight-0 copies, so every replica gets the same number of batches.
"""
from __future__ import annotations

import tensorflow as tf

from data.augment import Augment, Mix, augment_image, mix_batch
from data.decode import read_and_resize

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


def train_dataset(files, labels, *, image_size: int, global_batch_size: int, seed: int,
                  start_step: int, total_steps: int, augment: Augment = Augment(),
                  cache: bool = True, context: tf.distribute.InputContext | None = None,
                  mix: Mix | None = None) -> tf.data.Dataset:
    """Per-replica training batches for global steps [start_step, total_steps); with an
    enabled `mix`, float32 images and soft labels [B, classes]."""
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_shard(context)
    per_replica_batch = global_batch_size // (num_pipelines * replicas_per_pipeline)
    per_pipeline_batch = per_replica_batch * replicas_per_pipeline
    epoch_steps = steps_per_epoch(len(files), global_batch_size)
    if epoch_steps < 1:
        raise ValueError(f"{len(files)} training images are fewer than one global batch "
                         f"of {global_batch_size}")
    start_epoch, start_offset = divmod(start_step, epoch_steps)
    num_epochs = -(-total_steps // epoch_steps)
    epoch_images = epoch_steps * per_pipeline_batch

    shard_files = tf.constant(list(files)[pipeline_id::num_pipelines])
    shard_labels = tf.constant(list(labels)[pipeline_id::num_pipelines], tf.int32)
    shard_size = int(shard_files.shape[0])
    if cache:
        # Decode once into one uint8 tensor [shard, S, S, 3] (1/4 of float32) kept by
        # tf.data's cache; epochs then gather from it by index.
        images = tf.data.Dataset.from_tensor_slices(shard_files).map(
            lambda path: read_and_resize(path, image_size), num_parallel_calls=AUTOTUNE)
        source = images.batch(shard_size).cache()
    else:
        source = tf.data.Dataset.from_tensors(shard_files)

    def one_epoch(epoch):
        epoch_seed = _epoch_seed(seed, epoch)
        # The epoch's order: a stateless permutation of (seed, epoch), whatever the global seed.
        order = tf.argsort(tf.random.stateless_uniform(
            [shard_size], tf.stack([epoch_seed, tf.constant(pipeline_id, tf.int64)])))
        # Resume mid-epoch: start where the interrupted run stopped.
        first = tf.where(epoch == start_epoch, start_offset * per_pipeline_batch, 0)
        positions = tf.range(tf.cast(first, tf.int32), epoch_images)

        def take_epoch(shard):
            def prepare(position):
                index = order[position]
                image = shard[index] if cache else read_and_resize(shard[index], image_size)
                op_seed = tf.stack([epoch_seed, tf.cast(position * num_pipelines + pipeline_id,
                                                         tf.int64)])
                return (augment_image(image, op_seed, image_size, augment),
                        tf.gather(shard_labels, index), tf.ones([], tf.float32))
            return tf.data.Dataset.from_tensor_slices(positions).map(
                prepare, num_parallel_calls=AUTOTUNE)

        return source.flat_map(take_epoch)

    ds = tf.data.Dataset.range(start_epoch, num_epochs).flat_map(one_epoch)
    return batch_and_mix(ds, per_replica_batch=per_replica_batch, seed=seed,
                         start_step=start_step, total_steps=total_steps, context=context, mix=mix)


def batch_and_mix(ds: tf.data.Dataset, *, per_replica_batch: int, seed: int, start_step: int,
                  total_steps: int, context: tf.distribute.InputContext | None,
                  mix: Mix | None) -> tf.data.Dataset:
    """Examples from `start_step` on -> per-replica batches up to `total_steps`, mixed by an
    enabled `mix` (seeded by the global batch number: the same for a resumed run)."""
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_shard(context)
    ds = ds.batch(per_replica_batch, drop_remainder=True)
    ds = ds.take((total_steps - start_step) * replicas_per_pipeline)
    if mix is not None and mix.enabled:
        # Batch i of this pipeline (counted from step 0) has the global number
        # i * pipelines + pipeline id: the same for a resumed run.
        mix_seed = tf.constant([seed, 0x6D6978], tf.int64)

        def mix_one(index, batch):
            images, batch_labels, weights = batch
            number = index * num_pipelines + pipeline_id
            images, soft = mix_batch(images, batch_labels,
                                     tf.random.experimental.stateless_fold_in(mix_seed, number),
                                     mix)
            return images, soft, weights
        ds = ds.enumerate(start=start_step * replicas_per_pipeline).map(
            mix_one, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(files, labels, *, image_size: int, global_batch_size: int, cache: bool = True,
                 context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Every image once, in file order, padded with weight-0 copies to whole global batches."""
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
    ds = ds.map(lambda p, y, w: (read_and_resize(p, image_size), y, w), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    return ds.batch(per_replica_batch, drop_remainder=True).prefetch(AUTOTUNE)


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
