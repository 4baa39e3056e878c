"""--pretrained: the model whose weights a new run starts from (the "donor").

    imagenet            keras.applications' ImageNet backbone (downloaded once into
                        ~/.keras/models; a host without network access fails at once, in one
                        line, instead of hanging)
    FILE.keras          a whole saved model (model.keras of a run, or any Keras 3 model)
    FILE.weights.h5     weights of a --model of this registry (Keras 3 `save_weights`); the
                        class count of its head is read from the file
    MODEL_DIR           an earlier run of this trainer: its latest checkpoint (with its
                        averaged weights when it ran with --ema_decay)

The donor is loaded in float32 outside any strategy, before the data check, so that a wrong
source stops the run early; train.py then copies its weights into the new model by layer name
(models/transfer.py).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import warnings

import keras

from models import registry, transfer
from trainer.config import Config

# Seconds a connection attempt for the ImageNet weights may take before giving up.
DOWNLOAD_TIMEOUT_SECONDS = 10


class PretrainedError(ValueError):
    """The --pretrained source cannot be used; str() is a one-line message."""


@dataclasses.dataclass
class Donor:
    model: keras.Model
    description: str
    skip_head: bool  # the donor's head is not a trained head (ImageNet: built fresh)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def load_donor(config: Config) -> Donor:
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        source = config.pretrained
        if source == "imagenet":
            return _imagenet(config)
        if os.path.isdir(source):
            return _from_run(source)
        if source.endswith(".keras"):
            return _from_keras_file(source)
        return _from_weights_file(source, config)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _imagenet(config: Config) -> Donor:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
    try:
        with warnings.catch_warnings():  # "weights for input shape (224, 224) will be loaded"
            warnings.simplefilter("ignore")
            model = registry.build(config.model, 1, config.image_size, weights="imagenet")
    except Exception as e:  # urllib, DNS, proxy, timeout or a corrupt cached file
        raise PretrainedError(
            f"--pretrained=imagenet: could not get the ImageNet weights of {config.model} "
            f"({_first_line(e)}); on a host without network access put the file into "
            f"~/.keras/models first, or pass --pretrained=PATH (a .keras or .weights.h5 file "
            f"or a run's model_dir)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return Donor(model, f"ImageNet weights of keras.applications {config.model}", skip_head=True)


def _from_run(model_dir: str) -> Donor:
    from trainer.state.checkpoints import restore_model
    from trainer.state.run_dir import RunError, SavedRun
    try:
        run = SavedRun.load(model_dir)
        checkpoint = run.checkpoint_path("latest")
        model = restore_model(run, checkpoint)
    except RunError as e:
        raise PretrainedError(f"--pretrained={model_dir}: {e}") from None
    return Donor(model, f"the {run.model_name} of {checkpoint} ({len(run.class_names)} classes)",
                 skip_head=False)


def _from_keras_file(path: str) -> Donor:
    import models.batchnorm  # noqa: F401  (registers FusedBatchNormalization for load_model)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:
        raise PretrainedError(f"--pretrained={path}: not a loadable Keras model "
                              f"({_first_line(e)})") from None
    return Donor(model, f"{path} ({model.name})", skip_head=False)


def _from_weights_file(path: str, config: Config) -> Donor:
    try:
        classes = transfer.head_class_count_in_weights_file(path)
    except OSError as e:
        raise PretrainedError(f"--pretrained={path}: not an HDF5 weights file "
                              f"({_first_line(e)})") from None
    if classes is None:
        raise PretrainedError(f"--pretrained={path}: no head (top-level Dense layer) in the file; "
                              f"a .weights.h5 must come from a --model={config.model} of this "
                              f"trainer (or use a .keras file)")
    model = registry.build(config.model, classes, config.image_size)
    try:
        with warnings.catch_warnings():  # Keras warns once per layer before it raises
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except Exception as e:
        raise PretrainedError(f"--pretrained={path}: not the weights of a --model={config.model} "
                              f"({_first_line(e)})") from None
    return Donor(model, f"{path} ({config.model}, {classes} classes)", skip_head=False)
