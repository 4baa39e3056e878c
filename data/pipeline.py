"""tf.data input pipelines for training and evaluation.

Both take plain arguments and an optional `tf.distribute.InputContext`, and yield per-replica
batches of ``(uint8 images [B, S, S, 3], int32 labels [B], float32 weights [B])``.

Training order is a pure function of (seed, epoch): each epoch visits all files in a stateless
random permutation of (seed, epoch), cut into global batches; global batch b is elements
[b*G, (b+1)*G) of it, and replica k of the run (of any number of workers and replicas) gets
elements [k*r, (k+1)*r) of it (r = G / replicas). Augmentation uses stateless random ops seeded by
(seed, epoch, position in the epoch). Nothing depends on TensorFlow's global seed, on how many
epochs ran before in this process, or on how many workers or replicas read the stream: a run
resumed at global step k, on this or another number of workers or replicas with the same
global batch, trains on exactly the images an uninterrupted run would have seen from step k on.
Hence every input pipeline may need any file: with `cache`, each one decodes and keeps the whole
training set (image_size^2 * 3 bytes per image: 35,000 images at 224 px are 5.3 GB per worker).

With MixUp/CutMix (`Mix`), each per-replica batch is mixed with itself reversed, seeded
statelessly by (seed, global batch number): images become float32 and labels soft float32
[B, classes] rows summing to 1.

Evaluation visits every image exactly once: the file list is padded to a whole number of global
batches with weight-0 copies, so every replica gets the same number of batches.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time augmentation. `crop_min_area` < 1 enables random-resized crops;
    `randaugment` (N, M): N operations of magnitude M (0-10) per image, after crop and flip."""
    crop_min_area: float = 0.25
    flip: bool = True
    randaugment: tuple[int, float] | None = None


# --- RandAugment (Cubuk et al. 2019), stateless ------------------------------------------
# Each op takes a float32 image [H, W, 3] in 0-255, the magnitude m in [0, 1] (M / 10) and a
# random sign (+1 or -1) for the ops that have a direction, and returns the same.
_FILL = 128.0  # grey where geometric ops move pixels in from outside


def _blend(image, other, factor):
    return tf.clip_by_value(other + factor * (image - other), 0.0, 255.0)


def _grey(image):
    return tf.image.rgb_to_grayscale(image)


def _transform(image, transform):
    """Projective transform [a0, a1, a2, b0, b1, b2, c0, c1] mapping output to input points."""
    shape = tf.shape(image)[:2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
        output_shape=shape, fill_value=_FILL, interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[0]


def _rotate(image, m, sign):
    angle = sign * m * 30.0 * 3.141592653589793 / 180.0
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]))


def _shear_x(image, m, sign):
    s = sign * m * 0.3
    h = tf.cast(tf.shape(image)[0], tf.float32)
    return _transform(image, tf.stack([1.0, s, -s * (h - 1) / 2, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _shear_y(image, m, sign):
    s = sign * m * 0.3
    w = tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, -s * (w - 1) / 2, 0.0, 0.0]))


def _translate_x(image, m, sign):
    dx = sign * m * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, tf.stack([1.0, 0.0, -dx, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _translate_y(image, m, sign):
    dy = sign * m * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
    return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -dy, 0.0, 0.0]))


def _auto_contrast(image, m, sign):
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-3), 1.0)
    return tf.where(high > low, (image - low) * scale, image)


def _equalize(image, m, sign):
    def channel(c):
        c_int = tf.cast(c, tf.int32)
        hist = tf.math.bincount(tf.reshape(c_int, [-1]), minlength=256, maxlength=256,
                                dtype=tf.float32)
        cdf = tf.cumsum(hist)
        first = tf.reduce_min(tf.where(hist > 0, cdf, tf.reduce_max(cdf)))
        total = tf.reduce_max(cdf)
        lut = tf.where(total > first, (cdf - first) / tf.maximum(total - first, 1.0) * 255.0,
                       tf.range(256, dtype=tf.float32))
        return tf.gather(lut, c_int)
    return tf.stack([channel(image[..., i]) for i in range(3)], axis=-1)


def _solarize(image, m, sign):
    threshold = 256.0 - m * 256.0
    return tf.where(image < threshold, image, 255.0 - image)


def _posterize(image, m, sign):
    shift = tf.cast(tf.round(m * 4.0), tf.int32)  # keep 8 - 4m bits
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift),
                   tf.float32)


def _color(image, m, sign):
    return _blend(image, tf.tile(_grey(image), [1, 1, 3]), 1.0 + sign * m * 0.9)


def _contrast(image, m, sign):
    return _blend(image, tf.reduce_mean(_grey(image)), 1.0 + sign * m * 0.9)


def _brightness(image, m, sign):
    return _blend(image, tf.zeros_like(image), 1.0 + sign * m * 0.9)


def _sharpness(image, m, sign):
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "SAME")[0]
    return _blend(image, smooth, 1.0 + sign * m * 0.9)


RANDAUGMENT_OPS = (
    ("identity", lambda image, m, sign: image), ("auto_contrast", _auto_contrast),
    ("equalize", _equalize), ("rotate", _rotate), ("solarize", _solarize), ("color", _color),
    ("posterize", _posterize), ("contrast", _contrast), ("brightness", _brightness),
    ("sharpness", _sharpness), ("shear_x", _shear_x), ("shear_y", _shear_y),
    ("translate_x", _translate_x), ("translate_y", _translate_y))


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_ops: int, magnitude: float
                 ) -> tf.Tensor:
    """uint8 image -> uint8 image with `num_ops` ops drawn uniformly (with repetition) from
    RANDAUGMENT_OPS, each at `magnitude` (0-10) with a random direction; `seed`: stateless [2]."""
    m = float(magnitude) / 10.0
    x = tf.cast(image, tf.float32)
    for i in range(num_ops):
        op_seed = tf.random.experimental.stateless_fold_in(seed, i)
        which = tf.random.stateless_uniform([], op_seed, minval=0,
                                            maxval=len(RANDAUGMENT_OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(op_seed, 1)) < 0.5, -1.0, 1.0)
        branches = [lambda op=op: tf.ensure_shape(op(x, m, sign), image.shape)
                    for _, op in RANDAUGMENT_OPS]
        x = tf.clip_by_value(tf.switch_case(which, branches), 0.0, 255.0)
    return tf.cast(tf.round(x), tf.uint8)


@dataclasses.dataclass(frozen=True)
class Mix:
    """Batch mixing in training. `mixup_alpha` > 0: MixUp (images and labels blended by a
    Beta(a, a) weight); `cutmix_alpha` > 0: CutMix (a box of the partner image pasted in,
    labels weighted by area). Both: each batch uses one of the two with probability 1/2."""
    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _sample_beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
    """One stateless Beta(alpha, alpha) sample, as X / (X + Y) of two Gamma(alpha) samples."""
    gammas = tf.random.stateless_gamma([2], seed, alpha=alpha)
    return gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-12)


def mix_batch(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, mix: Mix
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """images [B, H, W, 3] (any dtype, 0-255), labels int [B] -> float32 images and soft labels
    [B, num_classes]; example i is mixed with example B-1-i of the same batch (timm's "flip"
    pairing). `seed`: a stateless seed [2]."""
    images = tf.cast(images, tf.float32)
    targets = tf.one_hot(labels, mix.num_classes, dtype=tf.float32)
    other_images, other_targets = tf.reverse(images, [0]), tf.reverse(targets, [0])

    def mixup():
        lam = _sample_beta(tf.random.experimental.stateless_fold_in(seed, 1), mix.mixup_alpha)
        return (lam * images + (1.0 - lam) * other_images,
                lam * targets + (1.0 - lam) * other_targets)

    def cutmix():
        lam = _sample_beta(tf.random.experimental.stateless_fold_in(seed, 2), mix.cutmix_alpha)
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        ratio = tf.sqrt(1.0 - lam)  # the box covers about 1 - lam of the image
        box_h = tf.cast(tf.round(ratio * tf.cast(height, tf.float32)), tf.int32)
        box_w = tf.cast(tf.round(ratio * tf.cast(width, tf.float32)), tf.int32)
        centre = tf.random.stateless_uniform([2], tf.random.experimental.stateless_fold_in(
            seed, 3), minval=0, maxval=2**30, dtype=tf.int32)
        cy, cx = centre[0] % height, centre[1] % width
        y0, y1 = tf.maximum(cy - box_h // 2, 0), tf.minimum(cy - box_h // 2 + box_h, height)
        x0, x1 = tf.maximum(cx - box_w // 2, 0), tf.minimum(cx - box_w // 2 + box_w, width)
        rows, cols = tf.range(height), tf.range(width)
        inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
        pasted = tf.where(inside[None, :, :, None], other_images, images)
        # The label weight is the area actually kept (the box is clipped at the borders).
        kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(height * width,
                                                                          tf.float32)
        return pasted, kept * targets + (1.0 - kept) * other_targets

    if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(seed, 4)) < 0.5
        return tf.cond(use_cutmix, cutmix, mixup)
    return cutmix() if mix.cutmix_alpha > 0 else mixup()


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
    if augment.randaugment:
        image.set_shape([image_size, image_size, 3])
        image = rand_augment(image, tf.random.experimental.stateless_fold_in(op_seed, 3),
                             *augment.randaugment)
    return image


def train_dataset(files, labels, *, image_size: int, global_batch_size: int, seed: int,
                  start_step: int, total_steps: int, augment: Augment = Augment(),
                  cache: bool = True, context: tf.distribute.InputContext | None = None,
                  mix: Mix | None = None, with_ids: bool = False) -> tf.data.Dataset:
    """Per-replica training batches (images, labels, weights) for global steps
    [start_step, total_steps); with an enabled `mix`, float32 images and soft labels
    [B, classes]; `with_ids` adds each image's index in `files` (int32 [B])."""
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_shard(context)
    per_replica_batch = global_batch_size // (num_pipelines * replicas_per_pipeline)
    per_pipeline_batch = per_replica_batch * replicas_per_pipeline
    epoch_steps = steps_per_epoch(len(files), global_batch_size)
    if epoch_steps < 1:
        raise ValueError(f"{len(files)} training images are fewer than one global batch "
                         f"of {global_batch_size}")
    start_epoch, start_offset = divmod(start_step, epoch_steps)
    num_epochs = -(-total_steps // epoch_steps)
    all_files = tf.constant(list(files))
    all_labels = tf.constant(list(labels), tf.int32)
    if cache:
        # Decode once into one uint8 tensor [files, S, S, 3] (1/4 of float32) kept by
        # tf.data's cache; epochs then gather from it by index.
        images = tf.data.Dataset.from_tensor_slices(all_files).map(
            lambda path: _read(path, image_size), num_parallel_calls=AUTOTUNE)
        source = images.batch(len(files)).cache()
    else:
        source = tf.data.Dataset.from_tensors(all_files)
    # This pipeline's elements of every global batch (see the module doc).
    own = pipeline_id * per_pipeline_batch + tf.range(per_pipeline_batch)

    def one_epoch(epoch):
        epoch_seed = _epoch_seed(seed, epoch)
        # The epoch's order: a stateless permutation of (seed, epoch), whatever the global seed.
        order = tf.argsort(tf.random.stateless_uniform(
            [len(files)], tf.stack([epoch_seed, tf.constant(0, tf.int64)])))
        # Resume mid-epoch: start where the interrupted run stopped.
        first = tf.where(epoch == start_epoch, start_offset, 0)
        steps = tf.range(tf.cast(first, tf.int32), epoch_steps)
        positions = tf.reshape(steps[:, None] * global_batch_size + own[None, :], [-1])

        def take_epoch(source_files):
            def prepare(position):
                index = order[position]
                image = source_files[index] if cache else _read(source_files[index], image_size)
                op_seed = tf.stack([epoch_seed, tf.cast(position, tf.int64)])
                return (_augment(image, op_seed, image_size, augment),
                        tf.gather(all_labels, index), tf.ones([], tf.float32),
                        tf.cast(index, tf.int32))
            return tf.data.Dataset.from_tensor_slices(positions).map(
                prepare, num_parallel_calls=AUTOTUNE)

        return source.flat_map(take_epoch)

    ds = tf.data.Dataset.range(start_epoch, num_epochs).flat_map(one_epoch)
    ds = ds.batch(per_replica_batch, drop_remainder=True)
    ds = ds.take((total_steps - start_step) * replicas_per_pipeline)
    if mix is not None and mix.enabled:
        ds = _mixed(ds, mix, seed, start_step, num_pipelines, pipeline_id, replicas_per_pipeline)
    if not with_ids:
        ds = ds.map(lambda images, y, w, ids: (images, y, w))
    return ds.prefetch(AUTOTUNE)


def _mixed(ds: tf.data.Dataset, mix: Mix, seed: int, start_step: int, num_pipelines: int,
           pipeline_id: int, replicas_per_pipeline: int) -> tf.data.Dataset:
    """MixUp/CutMix within each per-replica batch, seeded by its global replica-batch number
    (step * replicas + replica id): the same pairs for a resumed run on the same replicas."""
    mix_seed = tf.constant([seed, 0x6D6978], tf.int64)
    replicas = num_pipelines * replicas_per_pipeline

    def mix_one(index, batch):
        images, batch_labels, weights, ids = batch
        step, local_replica = index // replicas_per_pipeline, index % replicas_per_pipeline
        number = step * replicas + pipeline_id * replicas_per_pipeline + local_replica
        images, soft = mix_batch(images, batch_labels,
                                 tf.random.experimental.stateless_fold_in(mix_seed, number), mix)
        return images, soft, weights, ids
    return ds.enumerate(start=start_step * replicas_per_pipeline).map(
        mix_one, num_parallel_calls=AUTOTUNE)


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
