"""tf.data input pipelines for training and evaluation.

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

import dataclasses

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time augmentation. `crop_min_area` < 1 enables random-resized crops."""
    crop_min_area: float = 0.25
    flip: bool = True


def _bmp_palette_lookup(image_bytes: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """TensorFlow's BMP decoder returns the palette *indices* of an 8-bit BMP as grey levels;
    map them through the file's colour table (BGRA entries after the DIB header)."""
    header = tf.io.decode_raw(tf.strings.substr(image_bytes, 0, 54), tf.uint8)
    header = tf.cast(header, tf.int32)
    dib_size = header[14] + 256 * header[15] + 65536 * header[16]
    colours = header[46] + 256 * header[47] + 65536 * header[48]
    colours = tf.where((colours <= 0) | (colours > 256), 256, colours)
    table = tf.io.decode_raw(tf.strings.substr(image_bytes, 14 + dib_size, 4 * colours), tf.uint8)
    table = tf.reshape(table, [-1, 4])[:, 2::-1]  # BGRA -> RGB
    return tf.gather(table, tf.minimum(tf.cast(indices, tf.int32), tf.shape(table)[0] - 1))


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG (incl. grayscale and CMYK), PNG (grey, palette, RGBA, 16-bit), GIF (first
    frame), BMP (incl. 8-bit palette) or WebP bytes, whatever the file name says -> uint8
    [height, width, 3]. Raises tf.errors.InvalidArgumentError for anything else (empty files,
    truncated JPEGs, HTML pages); data/check.py runs this very function to find such files."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    # The first 30 bytes, zero-padded (a valid GIF can be shorter): "BM" and 8 bits per pixel.
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(image_bytes, 0, 30),
                                              b"\0" * 30]), 0, 30)
    is_palette_bmp = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 2), b"BM"),
                                    tf.equal(tf.strings.substr(head, 28, 2), b"\x08\x00"))
    return tf.cond(is_palette_bmp, lambda: _bmp_palette_lookup(image_bytes, image[:, :, 0]),
                   lambda: image)


def resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image bytes (see `decode_rgb`) -> uint8 [size, size, 3]; shared by training,
    evaluation, the data check and the exported model so that all see identical pixels."""
    return resize_uint8(decode_rgb(image_bytes), image_size)


def _read(path: tf.Tensor, image_size: int) -> tf.Tensor:
    return decode_and_resize(tf.io.read_file(path), image_size)


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


def _augment(image: tf.Tensor, op_seed: tf.Tensor, image_size: int, augment: Augment) -> tf.Tensor:
    crop_seed = tf.random.experimental.stateless_fold_in(op_seed, 1)
    flip_seed = tf.random.experimental.stateless_fold_in(op_seed, 2)
    if augment.crop_min_area < 1.0:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(augment.crop_min_area, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def train_dataset(files, labels, *, image_size: int, global_batch_size: int, seed: int,
                  start_step: int, total_steps: int, augment: Augment = Augment(),
                  cache: bool = True, context: tf.distribute.InputContext | None = None,
                  ) -> tf.data.Dataset:
    """Per-replica training batches for global steps [start_step, total_steps)."""
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
            lambda path: _read(path, image_size), num_parallel_calls=AUTOTUNE)
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
                image = shard[index] if cache else _read(shard[index], image_size)
                op_seed = tf.stack([epoch_seed, tf.cast(position * num_pipelines + pipeline_id,
                                                         tf.int64)])
                return (_augment(image, op_seed, image_size, augment),
                        tf.gather(shard_labels, index), tf.ones([], tf.float32))
            return tf.data.Dataset.from_tensor_slices(positions).map(
                prepare, num_parallel_calls=AUTOTUNE)

        return source.flat_map(take_epoch)

    ds = tf.data.Dataset.range(start_epoch, num_epochs).flat_map(one_epoch)
    ds = ds.batch(per_replica_batch, drop_remainder=True)
    ds = ds.take((total_steps - start_step) * replicas_per_pipeline)
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
    ds = ds.map(lambda p, y, w: (_read(p, image_size), y, w), num_parallel_calls=AUTOTUNE)
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
