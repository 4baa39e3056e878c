"""Two runs sharing one --data_cache_dir (data/diskcache.py): builders of the same cache at
once, a rebuild while another process reads the old version, another file set's cache beside
it, and leftovers of dead builders."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from data import diskcache
from tests.conftest import REPO

SIDE = 8
CHUNKS = 3


def _images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (CHUNKS * diskcache.CHUNK_IMAGES, SIDE,
                                                         SIDE, 3), dtype=np.uint8)


def _slow_stream(seed: int, delay: float):
    """A make_stream of CHUNKS chunks of `seed`'s images, `delay` seconds apart (so that
    builders started together overlap)."""
    images = _images(seed)

    def batches():
        for c in range(CHUNKS):
            part = slice(c * diskcache.CHUNK_IMAGES, (c + 1) * diskcache.CHUNK_IMAGES)
            yield images[part], np.arange(part.start, part.stop, dtype=np.int64)
            time.sleep(delay)

    def make_stream():
        return tf.data.Dataset.from_generator(batches, output_signature=(
            tf.TensorSpec([None, SIDE, SIDE, 3], tf.uint8), tf.TensorSpec([None], tf.int64)))
    return make_stream


def _read_all(chunks: diskcache.Chunks) -> np.ndarray:
    images, local = chunks.load_group(tf.range(len(chunks.sizes)))
    return images.numpy()[np.argsort(local.numpy())]


@pytest.mark.quick
def test_two_builders_of_one_cache_at_once_both_get_the_whole_cache(tmp_path):
    # Four builders of the same cache started together (runs of a sweep on the same data),
    # their chunks handed out at slightly different paces so that their writes interleave.
    results, errors, lines = {}, {}, []

    def build(who):
        try:
            results[who] = diskcache.open_or_build(
                str(tmp_path), "shared", "key-a", _slow_stream(0, delay=0.02 * who), SIDE,
                lines.append, CHUNKS * diskcache.CHUNK_IMAGES)
        except Exception as e:  # before the fix: FileExistsError from a builder's makedirs
            errors[who] = repr(e)

    threads = [threading.Thread(target=build, args=(who,)) for who in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, (errors, lines)
    # Before the fix a later builder deleted the earlier one's half-built folder ("rebuilding").
    assert not [line for line in lines if "rebuilding" in line], lines
    # They take turns: one builds, the others wait and reuse it (no duplicate copies).
    assert sum("reusing" in line for line in lines) == 3, lines
    assert sorted(results) == [0, 1, 2, 3] and None not in results.values(), lines
    for chunks in results.values():
        np.testing.assert_array_equal(_read_all(chunks), _images(0))
    leftovers = [n for n in os.listdir(tmp_path / "decoded") if n.startswith(".tmp-")]
    assert not leftovers, leftovers
    # Another file set's cache beside it, built while the first is read: each keeps its own.
    other = diskcache.open_or_build(str(tmp_path), "other", "key-b", _slow_stream(1, delay=0),
                                    SIDE, lines.append)
    np.testing.assert_array_equal(_read_all(results[0]), _images(0))
    np.testing.assert_array_equal(_read_all(other), _images(1))


_READER = """
import sys, numpy as np, tensorflow as tf
sys.path.insert(0, {repo!r})
from data import diskcache
from tests.test_diskcache_shared import _slow_stream, _read_all, _images
chunks = diskcache.open_or_build({cache!r}, "shared", "key-a", _slow_stream(0, delay=0), 8)
print("ready", flush=True)
sys.stdin.readline()
np.testing.assert_array_equal(_read_all(chunks), _images(0))
print("intact", flush=True)
"""


def test_a_rebuild_never_deletes_the_cache_another_process_reads(tmp_path):
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER.format(repo=str(REPO), cache=str(tmp_path))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(REPO))
    try:
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
        # The same source paths, changed files (another key): this run needs a new version.
        lines = []
        mine = diskcache.open_or_build(str(tmp_path), "shared", "key-changed",
                                       _slow_stream(1, delay=0), SIDE, lines.append)
        np.testing.assert_array_equal(_read_all(mine), _images(1))
        reader.stdin.write("\n")
        reader.stdin.flush()
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert "intact" in out, (out, err.strip().splitlines()[-1:], lines)
    assert any("in use by another process" in line for line in lines), lines


@pytest.mark.quick
def test_leftovers_of_dead_builders_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    decoded = tmp_path / "decoded"
    os.makedirs(decoded / f".tmp-shared-{dead.pid}-x")
    os.makedirs(decoded / f".tmp-shared-{os.getpid()}-y")  # a live builder (this process)
    diskcache.open_or_build(str(tmp_path), "shared", "key-a", _slow_stream(0, delay=0), SIDE)
    left = sorted(n for n in os.listdir(decoded) if n.startswith(".tmp-"))
    assert left == [f".tmp-shared-{os.getpid()}-y"], left
