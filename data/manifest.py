"""The manifest of a packed folder (data/pack.py writes it, last): its classes, splits and shards,
and the check that every shard is there with its size and SHA-256.

A packed folder is recognised by its `manifest.json`: a folder without it is never read as packed
data. Nothing here imports TensorFlow, so data.pack, data.check, trainer.evaluate and the bench
can refuse a bad packed folder (a missing, truncated or corrupt shard) in one line before
anything loads. Reading the shards for training is data/packed.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from data import layout
from data.files import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "birdtrainer-packed"
VERSION = 1
VERIFIED_CACHE = ".verified.json"


class DataError(ValueError):
    """Input data that cannot be used; str() is one line naming the file and the rule."""


def is_packed(data_dir: str) -> bool:
    return os.path.isfile(os.path.join(data_dir, MANIFEST))


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str  # name inside the packed folder
    indices: tuple[int, ...]  # item positions in its split, in record order
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    data_dir: str
    class_names: list[str]
    splits: dict[str, layout.SplitFiles]  # files relative to the packed data's source
    shards: dict[str, tuple[Shard, ...]]
    max_side: int

    def shard_path(self, shard: Shard) -> str:
        return os.path.join(self.data_dir, shard.file)


def read_manifest(data_dir: str) -> Manifest:
    path = os.path.join(data_dir, MANIFEST)
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise DataError(f"{path}: not a version-{VERSION} {FORMAT} manifest")
        splits, shards = {}, {}
        for name, split in raw["splits"].items():
            splits[name] = layout.SplitFiles(name, tuple(split["files"]), tuple(split["labels"]))
            shards[name] = tuple(Shard(s["file"], tuple(s["indices"]), s["bytes"], s["sha256"])
                                 for s in split["shards"])
        return Manifest(data_dir, list(raw["class_names"]), splits, shards,
                        int(raw.get("max_side") or 0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: unreadable packed-data manifest ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(manifest: Manifest, cache_dir: str | None = None, log=None) -> None:
    """Every shard present with its size and SHA-256; raises DataError naming the first bad one.
    Checksums are computed once per (file, size, mtime) and remembered in `.verified.json`
    (in the packed folder, or `cache_dir` when that is read-only)."""
    cache_path = os.path.join(manifest.data_dir, VERIFIED_CACHE)
    if not os.access(manifest.data_dir, os.W_OK):
        cache_path = os.path.join(cache_dir, VERIFIED_CACHE) if cache_dir else None
    try:
        with open(cache_path) as f:
            verified = json.load(f)
    except (OSError, ValueError, TypeError):
        verified = {}
    todo, new = [], {}
    for shard in (s for shards in manifest.shards.values() for s in shards):
        path = manifest.shard_path(shard)
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"packed shard {path}: missing (re-run data.pack or the sync)") \
                from None
        if st.st_size != shard.bytes:
            raise DataError(f"packed shard {path}: {st.st_size} bytes, the manifest says "
                            f"{shard.bytes} (truncated or replaced; re-run data.pack or the "
                            f"sync)")
        key = [st.st_size, st.st_mtime_ns, shard.sha256]
        new[shard.file] = key
        if verified.get(shard.file) != key:
            todo.append((shard, path))
    if todo and log and sum(s.bytes for s, _ in todo) > 1 << 30:
        log(f"packed data: verifying the checksums of {len(todo)} shards (once)")
    for shard, path in todo:
        if file_sha256(path) != shard.sha256:
            raise DataError(f"packed shard {path}: SHA-256 differs from the manifest (corrupt; "
                            f"re-run data.pack or the sync)")
    if cache_path and new != verified:
        try:
            atomic_write_text(cache_path, json.dumps(new))
        except OSError:
            pass  # only a cache
