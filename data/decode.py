"""Decoding image bytes to uint8 RGB, shared by training, evaluation, the data check, packing and
the exported model, so that all see identical pixels."""
from __future__ import annotations

import tensorflow as tf

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


def read_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """The image file at `path` -> uint8 [size, size, 3]."""
    return decode_and_resize(tf.io.read_file(path), image_size)
