"""Export a trained model for serving: a SavedModel in TF Serving's layout plus a .keras file.

    model_dir/export/<version>/saved_model.pb, variables/, assets/   (the SavedModel)
    model_dir/export/<version>/model.keras                            (the Keras model)

`version` is an integer (the global step, or a timestamp). Everything is written to a hidden
temporary folder beside it and renamed into place, so a half-written export never appears under
a version number (TF Serving only looks at numeric folder names).

The `serving_default` signature takes `images`, a 1-D string tensor of encoded JPEG/PNG (or
GIF/BMP) files, decodes each to the evaluation pixels with data.decode.decode_for_eval and the
run's --eval_crop (the very function and policy of the run's evaluations), and returns for each
image the top-k `classes` (names, string),
`probabilities` (float32, softmax(logits / T) with the temperature T of calibration, 1 when
uncalibrated) and `class_ids` (int32); with `unknown_below` = P > 0 the first class name is
`unknown` when the top-1 probability is below P. calibration.json beside it holds T and P;
preprocessing.json the pixels' policy (`preprocessing`: image_size, eval_crop and, for F < 1,
the short side before the crop), which the signature applies itself and a TFLite app must.
The class names are constants inside the graph: loading needs TensorFlow only, not this
project. `export_tflite` writes the TFLite models of the same calibrated probabilities.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from data import decode, files
from models import registry

SIGNATURE = "serving_default"
INPUT_NAME = "images"
KERAS_FILE = "model.keras"
CALIBRATION_FILE = "calibration.json"  # {"temperature", "unknown_below"} beside the model
PREPROCESSING_FILE = "preprocessing.json"  # the evaluation pixels' policy (`preprocessing`)
UNKNOWN = "unknown"


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


def calibrated_probabilities(logits, temperature: float = 1.0):
    """softmax(logits / T): the probabilities every export returns (T from calibration)."""
    return tf.nn.softmax(tf.cast(logits, tf.float32) / temperature)


def preprocessing(image_size: int, eval_crop: float) -> dict:
    """What preprocessing.json says about the input pixels (data.decode.decode_for_eval)."""
    eval_crop = decode.check_crop_fraction(eval_crop)
    if eval_crop == 1.0:
        how = (f"the whole image resized to {image_size}x{image_size} (aspect ratio not kept), "
               f"bilinear with antialiasing, rounded to uint8")
        return {"image_size": image_size, "eval_crop": eval_crop, "resize": how}
    short = decode.eval_scale_size(image_size, eval_crop)
    how = (f"the short side resized to {short} (the long side to floor({short} * long / short)),"
           f" bilinear with antialiasing, then the centre {image_size}x{image_size} (offsets "
           f"(extra) // 2), rounded to uint8")
    return {"image_size": image_size, "eval_crop": eval_crop, "short_side": short,
            "resize": how}


def _write_sidecars(folder: str, temperature: float, unknown_below: float, image_size: int,
                    eval_crop: float) -> None:
    """calibration.json (T and the `unknown` threshold) and preprocessing.json (the pixels'
    policy) beside an exported model."""
    with open(os.path.join(folder, CALIBRATION_FILE), "w") as f:
        json.dump({"temperature": float(temperature), "unknown_below": float(unknown_below)},
                  f, indent=2)
    with open(os.path.join(folder, PREPROCESSING_FILE), "w") as f:
        json.dump(preprocessing(image_size, eval_crop), f, indent=2)


def _serving_fn(model: keras.Model, class_names: list[str], image_size: int, top_k: int,
                temperature: float, unknown_below: float, eval_crop: float = 1.0):
    names = tf.constant(class_names, tf.string)

    def serve(images):
        pixels = tf.map_fn(lambda data: decode.decode_for_eval(data, image_size, eval_crop),
                           images,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                             tf.uint8))
        probabilities = calibrated_probabilities(model(pixels, training=False), temperature)
        top = tf.math.top_k(probabilities, k=top_k)
        classes = tf.gather(names, top.indices)
        if unknown_below > 0:  # an unsure top-1 is named `unknown` (its id stays the class's)
            unsure = top.values[:, :1] < unknown_below
            first = tf.where(unsure, tf.constant(UNKNOWN), classes[:, :1])
            classes = tf.concat([first, classes[:, 1:]], axis=1)
        return {"classes": classes, "probabilities": top.values, "class_ids": top.indices}
    return serve


@contextlib.contextmanager
def _staged_version(export_root: str, version: int, overwrite: bool):
    """Yields (staging, final): the caller writes the export into `staging`, a hidden folder
    beside `final` = export_root/<version>; on success it is renamed into place (with
    `overwrite`, the old version is moved aside first and removed after the swap), on any
    failure removed, so a half-written export never appears under a version number. Every file
    and folder of it is fsynced before the rename; its modes are those the umask allows."""
    version = int(version)
    final = os.path.join(export_root, str(version))
    if os.path.exists(final) and not overwrite:
        raise ExportError(f"{final} already exists (versions are never overwritten; pass "
                          f"--overwrite or another --version)")
    staging = files.make_staging_dir(export_root, f".tmp-{version}-")  # 0755 under umask 022
    try:
        yield staging, final
        files.fsync_tree(staging)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{version}-", dir=export_root)
            os.replace(final, os.path.join(old, "export"))
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        files.fsync_path(export_root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export(model: keras.Model, class_names: list[str], image_size: int, export_root: str,
           version: int, *, top_k: int = 5, overwrite: bool = False, temperature: float = 1.0,
           unknown_below: float = 0.0, eval_crop: float = 1.0) -> str:
    """Writes export_root/<version>/ (SavedModel + model.keras + calibration.json +
    preprocessing.json); returns its path. The signature decodes with the evaluation pixels
    of `eval_crop` (the run's --eval_crop) and returns softmax(logits / temperature); with
    `unknown_below` > 0 a top-1 probability below it is named `unknown`."""
    eval_crop = decode.check_crop_fraction(eval_crop)
    top_k = max(1, min(int(top_k), len(class_names)))
    with _staged_version(export_root, version, overwrite) as (staging, final):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name=SIGNATURE, fn=_serving_fn(model, list(class_names), image_size, top_k,
                                           float(temperature), float(unknown_below), eval_crop),
            input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
        archive.write_out(staging, verbose=False)
        model.save(os.path.join(staging, KERAS_FILE))
        _write_sidecars(staging, temperature, unknown_below, image_size, eval_crop)
    return final


TFLITE_FILES = {"float32": "model.tflite", "float16": "model_float16.tflite"}


def _tflite_bytes(model: keras.Model, image_size: int, temperature: float,
                  float16: bool) -> bytes:
    """The TFLite flatbuffer of pixels -> calibrated probabilities. It goes through a SavedModel:
    converting the tf.function directly (from_concrete_functions) leaves Keras 3's variables
    unfrozen, and the model then returns NaN (XNNPACK) or fails to read them."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE, fn=lambda pixels: {"probabilities": calibrated_probabilities(
            model(pixels, training=False), float(temperature))},
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                       name="pixels")])
    with tempfile.TemporaryDirectory(prefix="tflite-saved-model-") as saved:
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
        if float16:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def export_tflite(model: keras.Model, class_names: list[str], image_size: int, export_root: str,
                  version: int, *, temperature: float = 1.0, unknown_below: float = 0.0,
                  overwrite: bool = False, eval_crop: float = 1.0) -> str:
    """Writes export_root/<version>/ with model.tflite (float32), model_float16.tflite (float16
    weights, computed in float32), classes.json, calibration.json (T, and the
    `unknown_below` threshold for the app to apply) and preprocessing.json (the pixels'
    policy); returns its path. Each model takes `pixels`, float32 [N, image_size, image_size, 3]
    in 0-255 and returns `probabilities` [N, classes], softmax(logits / temperature). TFLite has
    no JPEG decoder, so the app prepares the pixels itself, and must prepare them as the run's
    evaluation did: `tflite_pixels` (data.decode.decode_for_eval with the run's --eval_crop),
    i.e. with `eval_crop` < 1 the short side resized to floor(image_size / eval_crop) and the
    centre image_size x image_size crop, as preprocessing.json spells out; with 1 the whole
    image squashed. Staged, then renamed."""
    eval_crop = decode.check_crop_fraction(eval_crop)
    with _staged_version(export_root, version, overwrite) as (staging, final):
        for kind, name in TFLITE_FILES.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(_tflite_bytes(model, image_size, temperature, float16=kind == "float16"))
        with open(os.path.join(staging, "classes.json"), "w") as f:
            json.dump(list(class_names), f, indent=2)
        _write_sidecars(staging, temperature, unknown_below, image_size, eval_crop)
    return final


def tflite_pixels(encoded_images, image_size: int, eval_crop: float = 1.0):
    """Encoded image files (bytes) -> the float32 [N, S, S, 3] input of the TFLite models: the
    evaluation pixels of `eval_crop` (data.decode.decode_for_eval), as the SavedModel's
    signature decodes them."""
    import numpy as np
    return np.stack([decode.decode_for_eval(tf.constant(data), image_size, eval_crop).numpy()
                     for data in encoded_images]).astype(np.float32)


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
