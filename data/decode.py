"""Decoding image bytes to uint8 RGB, shared by training, evaluation, the data check, packing and
the exported model, so that all see identical pixels.

Evaluation pixels (the trainer's evaluations, `trainer.evaluate`, the SavedModel's serving
signature, and what a TFLite app must feed) come from ONE function, `decode_for_eval`, with the
run's --eval_crop=F:

* F = 1.0 (the default): the whole image squashed to image_size x image_size (`resize_uint8`,
  aspect ratio not kept), exactly as training decodes it before augmentation;
* F < 1: the timm / big_vision convention: the short side resized to
  floor(image_size / F) (timm: `scale_size = math.floor(img_size / crop_pct)`), the long side
  in proportion (floor, as torchvision's Resize), then the centre image_size x image_size crop
  (offsets (extra) // 2, as big_vision's central_crop). E.g. 224 px with F=0.875: short side
  256, centre 224 x 224.

Both resize bilinearly with antialiasing in float32, then round and clip to uint8.
"""
from __future__ import annotations

import math

import tensorflow as tf

from data import pixels

# The pixel-count limit every decode here applies before decoding (--max_image_pixels; the
# trainer and trainer.evaluate set it from the run's config with `set_max_pixels`). The data
# check refuses such files first (data/pixels.py, in Python); this guard keeps a file that grew
# after the check (or a serving request) from being decoded at full size: it fails as a
# decode error (InvalidArgumentError), not as a process killed for memory.
_max_pixels = pixels.DEFAULT_MAX_IMAGE_PIXELS


def set_max_pixels(max_pixels: int | None) -> None:
    """The limit of the decoders traced from now on (0 or None: none)."""
    global _max_pixels
    _max_pixels = int(max_pixels or 0)


def _le(raw: tf.Tensor, start: int, count: int) -> tf.Tensor:
    """The little-endian unsigned integer of bytes [start, start + count) of uint8 `raw`."""
    value = tf.constant(0, tf.int64)
    for i in reversed(range(count)):
        value = value * 256 + tf.cast(raw[start + i], tf.int64)
    return value


def _be(raw: tf.Tensor, start: int, count: int) -> tf.Tensor:
    value = tf.constant(0, tf.int64)
    for i in range(count):
        value = value * 256 + tf.cast(raw[start + i], tf.int64)
    return value


def header_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """int64 width * height stated by a JPEG, PNG, GIF or BMP header (0 for other formats),
    read without decoding (the graph twin of data/pixels.py's header_size)."""
    raw = tf.io.decode_raw(tf.strings.substr(tf.strings.join([
        tf.strings.substr(image_bytes, 0, 32), b"\0" * 32]), 0, 32), tf.uint8)
    magic = tf.strings.substr(image_bytes, 0, 4)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
        return shape[0] * shape[1]

    def bmp():
        width, height = _le(raw, 18, 4), _le(raw, 22, 4)
        # int32 fields: a negative height is a top-down BMP
        width = tf.where(width >= 2 ** 31, 2 ** 32 - width, width)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)
        return width * height

    return tf.case([
        (tf.equal(tf.strings.substr(magic, 0, 3), b"\xff\xd8\xff"), jpeg),
        (tf.equal(magic, b"\x89PNG"), lambda: _be(raw, 16, 4) * _be(raw, 20, 4)),
        (tf.equal(tf.strings.substr(magic, 0, 3), b"GIF"),
         lambda: _le(raw, 6, 2) * _le(raw, 8, 2)),
        (tf.equal(tf.strings.substr(magic, 0, 2), b"BM"), bmp)],
        default=lambda: tf.constant(0, tf.int64), exclusive=False)


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
    truncated JPEGs, HTML pages, and images whose header states more pixels than the limit of
    `set_max_pixels`); data/check.py runs this very function to find such files."""
    checks = []
    if _max_pixels:
        checks.append(tf.debugging.assert_less_equal(
            header_pixels(image_bytes), tf.constant(_max_pixels, tf.int64),
            message=f"image over --max_image_pixels={_max_pixels} (not decoded)"))
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    # The first 30 bytes, zero-padded (a valid GIF can be shorter): "BM" and 8 bits per pixel.
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(image_bytes, 0, 30),
                                              b"\0" * 30]), 0, 30)
    is_palette_bmp = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 2), b"BM"),
                                    tf.equal(tf.strings.substr(head, 28, 2), b"\x08\x00"))
    return tf.cond(is_palette_bmp, lambda: _bmp_palette_lookup(image_bytes, image[:, :, 0]),
                   lambda: image)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return _to_uint8(image)


def eval_scale_size(image_size: int, crop_fraction: float) -> int:
    """The short side before the centre crop: floor(image_size / F) (timm's scale_size)."""
    return int(math.floor(image_size / crop_fraction))


def check_crop_fraction(crop_fraction: float) -> float:
    crop_fraction = float(crop_fraction)
    if not 0.0 < crop_fraction <= 1.0:  # also refuses nan
        raise ValueError(f"eval crop fraction must be in (0, 1], not {crop_fraction}")
    return crop_fraction


def resize_for_eval(image: tf.Tensor, image_size: int, crop_fraction: float = 1.0
                    ) -> tf.Tensor:
    """uint8 [h, w, 3] -> the evaluation pixels, uint8 [size, size, 3] (see the module doc):
    F = 1 squashes (`resize_uint8`, bit for bit); F < 1 resizes the short side to
    floor(size / F), keeping the aspect ratio, and takes the centre size x size."""
    crop_fraction = check_crop_fraction(crop_fraction)
    if crop_fraction == 1.0:
        return resize_uint8(image, image_size)
    scale_size = eval_scale_size(image_size, crop_fraction)
    shape = tf.shape(image, out_type=tf.int64)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    # Integer arithmetic: the long side is floor(scale_size * long / short), exactly.
    new_height = tf.where(height <= width, tf.constant(scale_size, tf.int64),
                          scale_size * height // short)
    new_width = tf.where(height <= width, scale_size * width // short,
                         tf.constant(scale_size, tf.int64))
    resized = tf.image.resize(image, tf.cast(tf.stack([new_height, new_width]), tf.int32),
                              method="bilinear", antialias=True)
    top = tf.cast((new_height - image_size) // 2, tf.int32)
    left = tf.cast((new_width - image_size) // 2, tf.int32)
    cropped = tf.image.crop_to_bounding_box(resized, top, left, image_size, image_size)
    cropped.set_shape([image_size, image_size, 3])
    return _to_uint8(cropped)


def decode_for_eval(image_bytes: tf.Tensor, image_size: int, crop_fraction: float = 1.0
                    ) -> tf.Tensor:
    """Encoded image bytes (see `decode_rgb`) -> the evaluation pixels of --eval_crop=F,
    uint8 [size, size, 3]: the one decoder of every evaluation, of the exported serving
    signature and of the TFLite input (see the module doc)."""
    return resize_for_eval(decode_rgb(image_bytes), image_size, crop_fraction)


def read_for_eval(path: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """The image file at `path` -> `decode_for_eval` pixels."""
    return decode_for_eval(tf.io.read_file(path), image_size, crop_fraction)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image bytes (see `decode_rgb`) -> uint8 [size, size, 3], squashed: training's
    decoding (before augmentation), packing and the disk cache; evaluation goes through
    `decode_for_eval`, which is this for --eval_crop=1."""
    return resize_uint8(decode_rgb(image_bytes), image_size)


def read_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """The image file at `path` -> uint8 [size, size, 3]."""
    return decode_and_resize(tf.io.read_file(path), image_size)
