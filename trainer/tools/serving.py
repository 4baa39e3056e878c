"""Export a trained model for serving: a SavedModel in TF Serving's layout plus a .keras file.

    model_dir/export/<version>/saved_model.pb, variables/, assets/   (the SavedModel)
    model_dir/export/<version>/model.keras                            (the Keras model)

`version` is an integer (the global step, or a timestamp). Everything is written to a hidden
temporary folder beside it and renamed into place, so a half-written export never appears under
a version number (TF Serving only looks at numeric folder names).

The `serving_default` signature takes `images`, a 1-D string tensor of encoded JPEG/PNG (or
GIF/BMP) files, decodes and resizes each with data.decode.decode_and_resize (the same function
as training and evaluation), and returns for each image the top-k `classes` (names, string),
`probabilities` (float32, softmax) and `class_ids` (int32). The class names are constants
inside the graph: loading needs TensorFlow only, not this project.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from data import decode
from models import registry

SIGNATURE = "serving_default"
INPUT_NAME = "images"
KERAS_FILE = "model.keras"


class ExportError(ValueError):
    """An export cannot be written or found; str() is a one-line message."""


def inference_copy(model: keras.Model, model_name: str, num_classes: int,
                   image_size: int, weights: list | None = None) -> keras.Model:
    """The same architecture built afresh in float32, outside any distribution strategy, with
    `model`'s weights (or `weights`, a `get_weights()` list): what gets exported whatever the
    training precision and strategy."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = registry.build(model_name, num_classes, image_size)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights(model.get_weights() if weights is None else weights)
    return copy


def _serving_fn(model: keras.Model, class_names: list[str], image_size: int, top_k: int):
    names = tf.constant(class_names, tf.string)

    def serve(images):
        pixels = tf.map_fn(lambda data: decode.decode_and_resize(data, image_size), images,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                             tf.uint8))
        logits = tf.cast(model(pixels, training=False), tf.float32)
        top = tf.math.top_k(tf.nn.softmax(logits), k=top_k)
        return {"classes": tf.gather(names, top.indices), "probabilities": top.values,
                "class_ids": top.indices}
    return serve


def export(model: keras.Model, class_names: list[str], image_size: int, export_root: str,
           version: int, *, top_k: int = 5, overwrite: bool = False) -> str:
    """Writes export_root/<version>/ (SavedModel + model.keras); returns its path."""
    version = int(version)
    top_k = max(1, min(int(top_k), len(class_names)))
    final = os.path.join(export_root, str(version))
    if os.path.exists(final) and not overwrite:
        raise ExportError(f"{final} already exists (versions are never overwritten; pass "
                          f"--overwrite or another --version)")
    os.makedirs(export_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_root)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name=SIGNATURE, fn=_serving_fn(model, list(class_names), image_size, top_k),
            input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
        archive.write_out(staging, verbose=False)
        model.save(os.path.join(staging, KERAS_FILE))
        if os.path.exists(final):  # overwrite: move the old one aside, then swap
            old = tempfile.mkdtemp(prefix=f".old-{version}-", dir=export_root)
            os.replace(final, os.path.join(old, "export"))
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def versions(export_root: str) -> list[int]:
    return sorted(int(name) for name in os.listdir(export_root)
                  if name.isdigit() and os.path.isdir(os.path.join(export_root, name)))


def resolve_export_dir(path: str) -> str:
    """`path` itself if it holds a saved_model.pb, else its highest numeric version folder."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    if not os.path.isdir(path):
        raise ExportError(f"--export_dir={path}: no such directory")
    found = versions(path)
    if not found:
        raise ExportError(f"--export_dir={path}: neither a SavedModel (no saved_model.pb) nor "
                          f"a folder of numbered versions")
    return os.path.join(path, str(found[-1]))
