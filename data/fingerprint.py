"""What a run's data was when the run began, so that a resume on other data is noticed.

A checkpoint's data position (step, epoch) means "this far through this epoch's order of these
files". `make_folder` keeps, per split, every readable file's path (relative to the dataset
root, so a copy elsewhere compares equal), size and a 64-bit fingerprint of its bytes that the
data check computes anyway (data/check.py, cached per file): a same-size changed file, a renamed
one, a file moved to another class are all differences. Modification times are not used: a
copy (rsync without -t, cp, an S3 sync) gives every file a new one, and an edit that keeps the
time would go unseen. `make_packed` keeps each split's shards (name, size, SHA-256 from the
manifest) and item count. The trainer writes the fingerprint into the run folder at the first
start (FILE_NAME) and compares at every resume (trainer/loop/inputs.py). Pure Python, no
TensorFlow.
"""
from __future__ import annotations

import json
import os

from data.files import atomic_write_text

FILE_NAME = "data_fingerprint.json"
VERSION = 1


class FingerprintError(ValueError):
    """An unreadable fingerprint file; str() is one line."""


def make_folder(data_dir: str, splits: dict, file_info: dict[str, tuple[int, str]]) -> dict:
    """The fingerprint of image-folder data: `splits` name -> SplitFiles (paths under
    `data_dir`, as the data check gives them), `file_info` path relative to `data_dir` ->
    (size, bytes fingerprint)."""
    result = {}
    for name, split in sorted(splits.items()):
        files = {}
        for path in split.files:
            rel = os.path.relpath(path, data_dir)
            size, digest = file_info[rel]
            files[rel] = [size, digest]
        result[name] = files
    return {"version": VERSION, "kind": "folder", "splits": result}


def make_packed(manifest) -> dict:
    """The fingerprint of packed data (a source.Manifest): per split its shards' [bytes,
    sha256] by file name (the shards hold the items; another item list is other shards)."""
    result = {name: {shard.file: [shard.bytes, shard.sha256] for shard in shards}
              for name, shards in sorted(manifest.shards.items())}
    return {"version": VERSION, "kind": "packed", "splits": result}


def read(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, FILE_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != VERSION or not isinstance(data.get("splits"), dict):
            raise ValueError(f"not a version-{VERSION} data fingerprint")
        return data
    except (OSError, ValueError, AttributeError) as e:
        raise FingerprintError(f"{path}: unreadable ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); move it away to "
                               f"record the data afresh") from None


def write(model_dir: str, fingerprint: dict) -> None:
    atomic_write_text(os.path.join(model_dir, FILE_NAME), json.dumps(fingerprint))


def split_change(name: str, before: dict, now: dict) -> str | None:
    """'train: 3 files added, 1 removed, 2 changed size, 1 changed content (same size)', or None
    when the split's files are the same."""
    common = before.keys() & now.keys()
    counts = ((len(now.keys() - before.keys()), "added"),
              (len(before.keys() - now.keys()), "removed"),
              (sum(before[k][0] != now[k][0] for k in common), "changed size"),
              (sum(before[k][0] == now[k][0] and before[k][1] != now[k][1] for k in common),
               "changed content (same size)"))
    parts = [f"{number} {what}" for number, what in counts if number]
    if not parts:
        return None
    first = next(number for number, _ in counts if number)
    parts[0] = parts[0].replace(" ", " file " if first == 1 else " files ", 1)
    return f"{name}: {', '.join(parts)}"


def differences(before: dict, now: dict) -> list[str]:
    """One phrase per split that differs (a split added or gone, or its files), in split
    order; [] when the data is the same."""
    if before.get("kind") != now.get("kind"):
        return [f"the data was {_kind(before)} when the run began and is {_kind(now)} now"]
    old, new = before["splits"], now["splits"]
    changes = []
    order = {"train": 0, "valid": 1, "test": 2}
    for name in sorted(old.keys() | new.keys(), key=lambda n: (order.get(n, 3), n)):
        if name not in new:
            changes.append(f"{name}: the split is gone ({len(old[name])} files before)")
        elif name not in old:
            changes.append(f"{name}: a new split ({len(new[name])} files)")
        elif line := split_change(name, old[name], new[name]):
            changes.append(line)
    return changes


def _kind(fingerprint: dict) -> str:
    return "packed shards" if fingerprint.get("kind") == "packed" else "image folders"
