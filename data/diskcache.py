"""Decoded training images on disk (`--cache_images=disk`): memory stays flat whatever the
dataset size, and no image is decoded twice.

One input pipeline's items are decoded once, in order, into raw uint8 chunk files of
`CHUNK_IMAGES` images [k, S, S, 3] under ``CACHE_DIR/decoded/<name>/`` (name: a hash of the
source's identity, the image size and the pipeline's share). `index.json`, written last, holds
the cache key (the source files' paths, sizes and modification times, or the packed shards'
checksums; the image size; the TensorFlow version) and each chunk's item indices. A cache is
used only when its key matches and every chunk has its exact size; otherwise it is deleted and
rebuilt, with one line saying why. A build is written under `.tmp-NAME-PID-*` and renamed
into place; runs sharing CACHE_DIR never delete a version another one reads (open_or_build).

Training reads the chunks with `grouped_epochs` (data/orders.py): `GROUP_CHUNKS` chunks at a
time, permuted by (seed, epoch), their images permuted within the group.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from data.decode import read_and_resize
from data.files import atomic_write_text, fsync_path, make_staging_dir
from data.progress import Progress

CHUNK_IMAGES = 256
GROUP_CHUNKS = 8
VERSION = 1
INDEX = "index.json"
_HELD: dict = {}  # lock path -> this process's shared locks on caches it reads


@dataclasses.dataclass(frozen=True)
class Chunks:
    directory: str
    sizes: tuple[int, ...]
    indices: tuple[tuple[int, ...], ...]  # local item indices of each chunk
    image_size: int

    def path(self, number: int) -> str:
        return os.path.join(self.directory, f"chunk-{number:06d}.raw")

    def load_group(self, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Chunk ids -> (uint8 images [k, S, S, 3], local indices [k]), in id order."""
        paths = tf.gather(tf.constant([self.path(i) for i in range(len(self.sizes))]), ids)
        data = tf.strings.reduce_join(tf.map_fn(tf.io.read_file, paths,
                                                fn_output_signature=tf.string))
        side = self.image_size
        images = tf.reshape(tf.io.decode_raw(data, tf.uint8), [-1, side, side, 3])
        ragged = tf.RaggedTensor.from_row_lengths(
            tf.constant([i for chunk in self.indices for i in chunk], tf.int64),
            tf.constant(self.sizes, tf.int64))
        return images, tf.gather(ragged, ids).flat_values


def _usable(directory: str, key: str, image_size: int) -> Chunks | None:
    try:
        with open(os.path.join(directory, INDEX)) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if index.get("key") != key:
        return None
    chunks = Chunks(directory, tuple(len(c) for c in index["chunks"]),
                    tuple(tuple(c) for c in index["chunks"]), image_size)
    for number, size in enumerate(chunks.sizes):
        path = chunks.path(number)
        if not os.path.exists(path) or os.path.getsize(path) != size * image_size ** 2 * 3:
            return None
    return chunks


def _lock(path: str, mode: int, blocking: bool = True):
    """`path` opened and flock'ed (fcntl.LOCK_SH or LOCK_EX); None when not blocking and held
    by another open file (another process, or another thread's open)."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, mode if blocking else mode | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _hold(lock_path: str, lock) -> None:
    """Keep `lock` (shared) for the rest of this process: tf.data reads the chunks until then."""
    fcntl.flock(lock, fcntl.LOCK_SH)
    _HELD.setdefault(lock_path, []).append(lock)


def _release_own(lock_path: str) -> None:
    """Drop this process's own shared locks on a cache: replacing its own older version is this
    process's business (another process's it never replaces)."""
    for lock in _HELD.pop(lock_path, []):
        lock.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_dead_builders(decoded: str, name: str) -> None:
    """Remove `.tmp-NAME-PID-*` folders (a build in progress, or a run's private copy) whose
    process is gone; those of live processes are theirs."""
    prefix = f".tmp-{name}-"
    for entry in os.scandir(decoded):
        pid = entry.name[len(prefix):].split("-")[0]
        if entry.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _write_chunks(directory: str, key: str, make_stream, num_items: int, log) -> None:
    indices = []
    progress = Progress("disk cache", num_items, log)
    for images, local in make_stream().rebatch(CHUNK_IMAGES).as_numpy_iterator():
        with open(os.path.join(directory, f"chunk-{len(indices):06d}.raw"), "wb") as f:
            f.write(np.ascontiguousarray(images, np.uint8).tobytes())
        indices.append([int(i) for i in local])
        progress.update(len(local))
    progress.close()
    atomic_write_text(os.path.join(directory, INDEX), json.dumps({"key": key,
                                                                  "chunks": indices}))
    log(f"disk cache: {sum(map(len, indices))} decoded images in {len(indices)} chunks")


def open_or_build(cache_dir: str, name: str, key: str, make_stream, image_size: int,
                  log=None, num_items: int = 0) -> Chunks:
    """The chunks under CACHE_DIR/decoded/NAME for `key`, built from `make_stream()` (a
    dataset of (uint8 images [k, S, S, 3], int64 local indices [k]) batches of `num_items` in
    all) when missing or stale.

    Several processes may share CACHE_DIR: builders of one NAME take turns (`.NAME.build`,
    exclusive), so a second one reuses what the first built; a reader holds `.NAME.lock`
    shared for the rest of its process, and a version is deleted or replaced only under that
    lock exclusive. A rebuild while another process reads the old version builds this run's
    own copy beside it instead. Builds go to `.tmp-NAME-PID-*` and are renamed into place."""
    if not cache_dir:
        raise ValueError("a disk cache needs a cache directory")
    log = log or (lambda message: None)
    decoded = os.path.join(cache_dir, "decoded")
    os.makedirs(decoded, exist_ok=True)
    directory, lock_path = os.path.join(decoded, name), os.path.join(decoded, f".{name}.lock")
    build_lock = _lock(os.path.join(decoded, f".{name}.build"), fcntl.LOCK_EX, blocking=False)
    if build_lock is None:
        log(f"disk cache: waiting for another process building {directory}")
        build_lock = _lock(os.path.join(decoded, f".{name}.build"), fcntl.LOCK_EX)
    with build_lock:
        reading = _lock(lock_path, fcntl.LOCK_SH)
        chunks = _usable(directory, key, image_size)
        if chunks is not None:
            log(f"disk cache: reusing {directory} ({sum(chunks.sizes)} decoded images)")
            _hold(lock_path, reading)
            return chunks
        reading.close()
        _release_own(lock_path)
        _remove_dead_builders(decoded, name)
        return _build(decoded, name, key, make_stream, image_size, log, num_items)


def _build(decoded, name, key, make_stream, image_size, log, num_items) -> Chunks:
    """Build NAME's chunks (the caller holds the build lock) in place of the old version when
    no other process reads it, else as this run's own copy."""
    directory, lock_path = os.path.join(decoded, name), os.path.join(decoded, f".{name}.lock")
    replacing = _lock(lock_path, fcntl.LOCK_EX, blocking=False)
    if replacing is None:
        log(f"disk cache: {directory} is in use by another process (built from other source "
            f"files or another image size): this run builds its own copy beside it, removed by "
            f"a later build once this process is gone")
    elif os.path.exists(directory):
        log(f"disk cache: rebuilding {directory} (the source files or the image size changed, "
            f"or the cache is incomplete)")
        shutil.rmtree(directory)  # first: the room check counted on its bytes
    else:
        log(f"disk cache: building {directory}")
    staging = make_staging_dir(decoded, f".tmp-{name}-{os.getpid()}-")
    try:
        _write_chunks(staging, key, make_stream, num_items, log)
        if replacing is None:
            return _usable(staging, key, image_size)  # kept while this process lives
        os.replace(staging, directory)
        fsync_path(decoded)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _hold(lock_path, replacing)
    return _usable(directory, key, image_size)


def _digest(*parts) -> str:
    digest = hashlib.sha256(f"{VERSION} {tf.__version__}".encode())
    for part in parts:
        digest.update(b"\0" + str(part).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def folder_name(files: list[str], image_size: int) -> str:
    """The cache folder name (under CACHE_DIR/decoded) of one pipeline's image files."""
    return _digest("files", image_size, *[os.path.abspath(f) for f in files])[:24]


def existing_bytes(cache_dir: str, name: str) -> int:
    """Bytes a cache under CACHE_DIR/decoded/NAME already holds (reused or rebuilt in place:
    room a new one may count on)."""
    directory = os.path.join(cache_dir or "", "decoded", name)
    if not os.path.isdir(directory):
        return 0
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())


def for_files(cache_dir: str, files: list[str], image_size: int, log=None) -> Chunks:
    """The disk cache of one pipeline's image files (in the given order)."""
    name = folder_name(files, image_size)
    stats = [os.stat(f) for f in files]
    key = _digest(name, *[(s.st_size, s.st_mtime_ns) for s in stats])

    def make_stream():
        ds = tf.data.Dataset.from_tensor_slices(list(files)).map(
            lambda path: read_and_resize(path, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        return tf.data.Dataset.zip(ds, tf.data.Dataset.range(len(files))).batch(CHUNK_IMAGES)
    return open_or_build(cache_dir, name, key, make_stream, image_size, log, len(files))
