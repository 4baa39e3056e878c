"""One source interface (data/source.py): open_source gives a folder, a packed folder or random
images, and the three answer the same two calls with one InputSpec (data/spec.py) alike."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data import check, pack, source
from data.augment import Augment
from data.datasets import FolderSource, SyntheticSource
from data.packed import PackedSource
from data.spec import InputSpec
from tests.conftest import REPO

pytestmark = pytest.mark.quick

SPEC = InputSpec(image_size=16, global_batch_size=8, seed=2, eval_global_batch_size=12,
                 augment=Augment(crop_min_area=0.5, flip=True), cache="memory",
                 eval_cache="none")


@pytest.fixture(scope="module")
def sources(small_demo_dir, tmp_path_factory):
    packed_dir = tmp_path_factory.mktemp("packed") / "small"
    pack.pack(str(small_demo_dir), str(packed_dir), shard_mb=0.02, log=lambda m: None)
    splits = check.scan(str(small_demo_dir)).splits
    return {"folder": source.open_source(str(small_demo_dir)),
            "packed": source.open_source(str(packed_dir)),
            "synthetic": source.open_source(None, synthetic=True, num_classes=10)}, splits


def _split(kind, opened, splits, name):
    """The split a source serves: the manifest's for packed data, the data check's otherwise
    (random images take any split of that many items)."""
    return opened.manifest.splits[name] if kind == "packed" else splits[name]


def test_open_source_returns_each_kind(sources):
    opened, _ = sources
    assert {kind: type(s) for kind, s in opened.items()} == {
        "folder": FolderSource, "packed": PackedSource, "synthetic": SyntheticSource}
    assert {kind: s.kind for kind, s in opened.items()} == {k: k for k in opened}


def _pipelines(make, n: int = 2) -> list[list]:
    """Each of `n` input pipelines' batches (2 replicas per pipeline) as numpy tuples."""
    return [[tuple(t.numpy() for t in batch)
             for batch in make(tf.distribute.InputContext(n, i, 2 * n))] for i in range(n)]


def test_the_three_sources_give_the_same_shaped_batches_through_one_interface(sources):
    """(Random images are not augmented or mixed: SPEC has no mix, as --synthetic_data
    ignores --mixup_alpha.)"""
    opened, splits = sources
    shapes, train = {}, {}
    for kind, data in opened.items():
        split, valid = (_split(kind, data, splits, name) for name in ("train", "valid"))
        train[kind] = _pipelines(lambda context: data.train_dataset(
            split, SPEC, context, start_step=3, total_steps=7))
        evaluated = _pipelines(lambda context: data.eval_dataset(valid, SPEC, context))
        shapes[kind] = ([[(t.shape, t.dtype) for t in b] for p in train[kind] for b in p],
                        [[(t.shape, t.dtype) for t in b] for p in evaluated for b in p])
        # Every evaluation item once over both pipelines (weight-0 padding past the end).
        assert sum(b[2].sum() for p in evaluated for b in p) == len(valid) == 80
    # 4 steps x 2 replicas per pipeline of (uint8 images [2, 16, 16, 3], int32 labels [2],
    # float32 weights [2]); 80 evaluation items padded to 84 at global batch 12: 14 batches of
    # 3 per pipeline.
    assert shapes["folder"] == shapes["packed"] == shapes["synthetic"]
    assert len(shapes["folder"][0]) == 2 * 4 * 2 and len(shapes["folder"][1]) == 2 * 14
    assert shapes["folder"][0][0] == [((2, 16, 16, 3), np.uint8), ((2,), np.int32),
                                      ((2,), np.float32)]
    assert shapes["folder"][1][0] == [((3, 16, 16, 3), np.uint8), ((3,), np.int32),
                                      ((3,), np.float32)]
    # The memory cache: a packed folder trains on the very batches of the folder it came from.
    for a, b in zip(sum(train["folder"], []), sum(train["packed"], [])):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_the_manifest_module_and_the_tools_that_read_it_load_no_tensorflow():
    probe = ("import sys, data.manifest, data.pack, data.check; "
             "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
