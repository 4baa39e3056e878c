"""Fine-tuning helpers: copy weights from another model by layer name, and freeze the backbone.

The head is the Dense layer named "logits" (models/builders.py); every other layer is the
backbone. Weights are matched by the name of the layer that owns them, nested models
(keras.applications backbones) flattened. Keras numbers the names of unnamed layers per process
("layer_normalization_3"), so layers left unmatched by their exact name are paired in model
order among those with the same name stem. A layer whose variables differ in shape is not
copied: for the head that means a different class count, and the head keeps its fresh weights.
"""
from __future__ import annotations

import collections
import dataclasses
import re

import keras
import numpy as np

from models.builders import HEAD


def weight_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers that own variables, in model order, nested models flattened."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += weight_layers(layer)
        elif _own_variables(layer):
            found.append(layer)
    return found


def _own_variables(layer) -> dict[str, np.ndarray]:
    store: dict = {}
    layer.save_own_variables(store)
    return {key: np.asarray(keras.ops.convert_to_numpy(value)) for key, value in store.items()}


def _stem(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


@dataclasses.dataclass
class TransferReport:
    copied: list[str]  # target layer names whose variables were copied
    not_found: list[str]  # target layers with no counterpart in the source
    shape_mismatch: list[str]  # counterparts with other shapes (the head: another class count)
    total: int  # target layers with variables
    head_replaced: bool  # the head was left with fresh weights

    @property
    def backbone_copied(self) -> int:
        return sum(1 for name in self.copied if name != HEAD)

    def describe(self) -> str:
        text = (f"copied the weights of {len(self.copied)} of {self.total} layers by name")
        if self.head_replaced:
            text += "; new head (logits)"
        left = [name for name in self.not_found + self.shape_mismatch if name != HEAD]
        if left:
            text += f"; {len(left)} backbone layer(s) kept fresh weights: {', '.join(left[:5])}"
            text += " ..." if len(left) > 5 else ""
        return text


def copy_weights_by_name(source: keras.Model, target: keras.Model, *,
                         skip_head: bool = False) -> TransferReport:
    """Copy every layer's variables from `source` into the same-named layer of `target` when
    their shapes agree. Normalization layers are not copied (their constants are part of the
    architecture, set by the builder); with `skip_head` neither is the head."""
    source_layers = weight_layers(source)
    by_name = {layer.name: layer for layer in source_layers}
    target_layers = weight_layers(target)
    pairs, unmatched = [], []
    used = set()
    for layer in target_layers:
        if layer.name in by_name:
            pairs.append((by_name[layer.name], layer))
            used.add(layer.name)
        else:
            unmatched.append(layer)
    by_stem = collections.defaultdict(collections.deque)
    for layer in source_layers:
        if layer.name not in used:
            by_stem[_stem(layer.name)].append(layer)
    not_found = []
    for layer in unmatched:
        queue = by_stem[_stem(layer.name)]
        if queue:
            pairs.append((queue.popleft(), layer))
        else:
            not_found.append(layer.name)
    copied, mismatch = [], []
    head_replaced = skip_head
    for src, dst in pairs:
        if isinstance(dst, keras.layers.Normalization) or (skip_head and dst.name == HEAD):
            continue
        values, current = _own_variables(src), _own_variables(dst)
        if sorted(values) != sorted(current) or any(
                values[key].shape != current[key].shape for key in current):
            mismatch.append(dst.name)
            head_replaced = head_replaced or dst.name == HEAD
            continue
        dst.load_own_variables({key: values[key].astype(current[key].dtype)
                                for key in current})
        copied.append(dst.name)
    if HEAD in not_found:
        head_replaced = True
    total = sum(1 for layer in target_layers if not isinstance(layer, keras.layers.Normalization))
    return TransferReport(copied, not_found, mismatch, total, head_replaced)


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze (or unfreeze) every layer but the head. A frozen BatchNormalization layer runs in
    inference mode (Keras 3: training=True and trainable=False use the moving statistics) and
    its moving statistics stay as they are. Variables that were never trainable stay so."""
    for layer in model.layers:
        if layer.name != HEAD:
            layer.trainable = trainable


def backbone_variables(model: keras.Model) -> list:
    """The trainable variables outside the head."""
    head = {id(v) for v in model.get_layer(HEAD).trainable_variables}
    return [v for v in model.trainable_variables if id(v) not in head]


def head_class_count_in_weights_file(path: str) -> int | None:
    """The class count of the head stored in a Keras 3 `.weights.h5` file written from one of
    our models: its top-level Dense layer ("layers/dense/vars/0", the head kernel [features,
    classes]); None if the file has no such entry."""
    import h5py
    with h5py.File(path, "r") as f:
        for key in ("layers/dense/vars/0", "_layer_checkpoint_dependencies/dense/vars/0"):
            if key in f:
                return int(f[key].shape[-1])
    return None
