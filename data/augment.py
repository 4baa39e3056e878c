"""Training-time augmentation, all with stateless random ops (a resumed run augments the same
images the same way): random-resized crop and flip (`Augment`, `augment_image`), RandAugment
(`rand_augment`, `RANDAUGMENT_OPS`), and MixUp/CutMix over a batch (`Mix`, `mix_batch`).

With MixUp/CutMix, each per-replica batch is mixed with itself reversed, seeded statelessly by
(seed, global batch number): images become float32 and labels soft float32 [B, classes] rows
summing to 1.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

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


def augment_image(image: tf.Tensor, op_seed: tf.Tensor, image_size: int, augment: Augment
                  ) -> tf.Tensor:
    """uint8 image -> uint8 [image_size, image_size, 3]: crop, flip, RandAugment as `augment`
    says, seeded by the stateless seed `op_seed` [2]."""
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
