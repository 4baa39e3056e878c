"""Pack an image folder into TFRecord shards, for datasets larger than memory and fast syncs.

    python -m data.pack --data_dir=DIR --dest=DIR [--max_side=N] [--shard_mb=M]
                        [--skip_unknown_classes] [--on_bad_file=skip|fail]

runs the data check (data/check.py) on DIR and packs only the files that passed: each split
becomes `<split>-NNNNN-of-MMMMM.tfrecord` shards of about M MB, one record per image (the image
bytes as stored, or re-encoded as JPEG when a side exceeds --max_side; the label id; the item's
position in its split; its path relative to DIR). Train records are spread over the shards in a
fixed pseudo-random order, so that every shard holds every class; valid/test keep the check's
order. DEST also gets classes.json, the check's report (data_report.txt/.json) and, last,
manifest.json (the shards with their record positions, sizes and SHA-256): a folder without it is
never taken for packed data.

Each shard is written under a temporary name, fsynced and renamed when complete; a re-run skips
the shards already finished for the same files and options (`.pack-progress.json`), so a killed
pack resumes. DEST must be new, empty or a folder data.pack wrote (one line otherwise, nothing
changed); shards of an earlier plan are deleted only when data.pack wrote them (named by its
manifest or progress file): another program's .tfrecord files are left, with a warning line. Exit code 0 when packed, 1 when the data check or the input fails (one line), 2 for
a usage error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

from data import check, layout, manifest
from data.files import atomic_write_text, fsync_path
from data.progress import Progress

PROGRESS = ".pack-progress.json"
TRAIN_ORDER_SEED = 20261130


def plan_shards(data_dir: str, split: layout.SplitFiles, shard_mb: float, shuffle: bool
                ) -> list[list[int]]:
    """Item positions per shard: consecutive positions (train: in a fixed shuffled order) until
    a shard reaches `shard_mb` MB of source bytes."""
    order = np.arange(len(split))
    if shuffle:
        order = np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(split))
    limit, shards, current, size = shard_mb * 1e6, [], [], 0
    for position in order.tolist():
        current.append(position)
        size += os.path.getsize(split.files[position])
        if size >= limit:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def _shard_key(split: layout.SplitFiles, positions: list[int], max_side: int) -> str:
    digest = hashlib.sha256(f"{manifest.VERSION} {max_side}".encode())
    for position in positions:
        st = os.stat(split.files[position])
        digest.update(f"\n{split.files[position]}\t{split.labels[position]}\t{position}\t"
                      f"{st.st_size}\t{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _image_bytes(path: str, max_side: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if not max_side:
        return data
    import tensorflow as tf
    from data import decode
    image = decode.decode_rgb(tf.constant(data))
    height, width = int(image.shape[0]), int(image.shape[1])
    if max(height, width) <= max_side:
        return data
    scale = max_side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return tf.io.encode_jpeg(resized, quality=95).numpy()


def write_shard(path: str, split: layout.SplitFiles, rel_files: list[str],
                positions: list[int], max_side: int) -> None:
    """The records of `positions`, written to a temporary file renamed to `path` when whole."""
    import tensorflow as tf
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for position in positions:
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[
                        _image_bytes(split.files[position], max_side)])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(
                        value=[split.labels[position]])),
                    "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[position])),
                    "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[
                        rel_files[position].encode("utf-8", "surrogateescape")]))}
                writer.write(tf.train.Example(features=tf.train.Features(
                    feature=feature)).SerializeToString())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_progress(dest: str) -> dict:
    try:
        with open(os.path.join(dest, PROGRESS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def pack_split(data_dir: str, dest: str, split: layout.SplitFiles, *, max_side: int,
               shard_mb: float, progress: dict, log) -> dict:
    """Write (or keep) the shards of one split; returns its manifest entry."""
    rel_files = [os.path.relpath(f, data_dir) for f in split.files]
    plan = plan_shards(data_dir, split, shard_mb, shuffle=split.name == "train")
    shards = []
    written = Progress(f"pack {split.name}", sum(map(len, plan)), log=None)  # shard lines
    for number, positions in enumerate(plan):
        name = f"{split.name}-{number:05d}-of-{len(plan):05d}.tfrecord"
        path = os.path.join(dest, name)
        key = _shard_key(split, positions, max_side)
        done = progress.get(name)
        if not (done and done["key"] == key and os.path.exists(path)
                and os.path.getsize(path) == done["bytes"]):
            write_shard(path, split, rel_files, positions, max_side)
            done = {"key": key, "bytes": os.path.getsize(path),
                    "sha256": manifest.file_sha256(path)}
            progress[name] = done
            atomic_write_text(os.path.join(dest, PROGRESS), json.dumps(progress))
            written.update(len(positions))
            log(f"pack: wrote {name} ({len(positions)} images, {done['bytes'] / 1e6:.1f} MB; "
                f"{written.status()})")
        else:
            written.total -= len(positions)  # kept: the count and rate are of what is written
        shards.append({"file": name, "indices": positions, "bytes": done["bytes"],
                       "sha256": done["sha256"]})
    return {"files": rel_files, "labels": list(split.labels), "shards": shards}


def pack(data_dir: str, dest: str, *, max_side: int = 0, shard_mb: float = 100.0,
         skip_unknown_classes: bool = False, on_bad_file: str = "skip", log=print) -> dict:
    """Check `data_dir` and pack what passed into `dest`; returns the manifest. Raises
    manifest.DataError (one line) when the check finds errors or `dest` is unusable."""
    _check_dest(dest, data_dir)
    scanned = check.scan(data_dir, skip_unknown_classes=skip_unknown_classes,
                         on_bad_file=on_bad_file, cache_path=check.default_cache_path(data_dir),
                         log=log)
    os.makedirs(dest, exist_ok=True)
    earlier = _manifest_shards(dest)
    if os.path.exists(os.path.join(dest, manifest.MANIFEST)):  # not "complete" while it changes
        os.remove(os.path.join(dest, manifest.MANIFEST))
    report_path = scanned.report.write(dest)
    for warning in scanned.report.warnings:
        log(f"warning: {warning}")
    if scanned.report.errors:
        raise manifest.DataError(f"data check: {scanned.report.error_line(report_path)}")
    progress = _read_progress(dest)
    contents = {"format": manifest.FORMAT, "version": manifest.VERSION,
                "class_names": scanned.class_names, "max_side": max_side,
                "source": os.path.abspath(data_dir), "splits": {}}
    for name, split in scanned.splits.items():
        contents["splits"][name] = pack_split(data_dir, dest, split, max_side=max_side,
                                              shard_mb=shard_mb, progress=progress, log=log)
    wanted = {s["file"] for split in contents["splits"].values() for s in split["shards"]}
    _remove_earlier_shards(dest, wanted, earlier, progress, log)
    atomic_write_text(os.path.join(dest, "classes.json"), json.dumps(scanned.class_names,
                                                                     indent=1))
    atomic_write_text(os.path.join(dest, manifest.MANIFEST), json.dumps(contents))
    return contents


def _check_dest(dest: str, data_dir: str) -> None:
    """--dest is new, empty, or a folder data.pack wrote (it holds manifest.json or the progress
    file): a pack never writes into, or deletes from, another program's folder."""
    if os.path.abspath(dest) == os.path.abspath(data_dir):
        raise manifest.DataError(f"--dest={dest}: must not be the --data_dir itself")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise manifest.DataError(f"--dest={dest}: exists and is not a folder")
    if os.path.isdir(dest) and os.listdir(dest) and not any(
            os.path.exists(os.path.join(dest, name)) for name in (manifest.MANIFEST, PROGRESS)):
        raise manifest.DataError(f"--dest={dest}: a non-empty folder that data.pack did not "
                                 f"write (no {manifest.MANIFEST} or {PROGRESS}); nothing was "
                                 f"changed: give a new or empty folder")


def _manifest_shards(dest: str) -> set[str]:
    """The shard names of the manifest an earlier pack wrote into `dest` (none if unreadable)."""
    try:
        with open(os.path.join(dest, manifest.MANIFEST)) as f:
            splits = json.load(f).get("splits", {})
        return {s["file"] for split in splits.values() for s in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _remove_earlier_shards(dest: str, wanted: set[str], earlier: set[str], progress: dict,
                           log) -> None:
    """Delete the shards of an earlier plan (other files or options) that data.pack wrote (named
    by the earlier manifest or the progress file); any other .tfrecord is left, with a line."""
    ours, kept = earlier | set(progress), []
    for name in sorted(os.listdir(dest)):
        if not name.endswith(".tfrecord") or name in wanted:
            continue
        if name in ours:
            os.remove(os.path.join(dest, name))
            progress.pop(name, None)
        else:
            kept.append(name)
    atomic_write_text(os.path.join(dest, PROGRESS), json.dumps(progress))
    if kept:
        log(f"warning: left {len(kept)} .tfrecord file(s) that data.pack did not write in "
            f"{dest} (e.g. {kept[0]}); the manifest does not name them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.pack", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="image folder (train/, valid/, test/)")
    parser.add_argument("--dest", required=True, help="the packed folder to write")
    parser.add_argument("--max_side", type=int, default=0, help="re-encode images whose longer "
                        "side exceeds N pixels (JPEG, quality 95); 0: keep every file as stored")
    parser.add_argument("--shard_mb", type=float, default=100.0, help="shard size in MB")
    parser.add_argument("--skip_unknown_classes", action="store_true")
    parser.add_argument("--on_bad_file", choices=check.ON_BAD_FILE, default="skip")
    args = parser.parse_args(argv)
    if args.max_side < 0 or not args.shard_mb > 0:
        parser.error("--max_side must be >= 0 and --shard_mb > 0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        manifest = pack(args.data_dir, args.dest, max_side=args.max_side,
                        shard_mb=args.shard_mb, skip_unknown_classes=args.skip_unknown_classes,
                        on_bad_file=args.on_bad_file, log=lambda m: print(m, flush=True))
    except (manifest.DataError, layout.LayoutError, OSError) as e:
        print(f"data.pack: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name} {len(split['files'])} images in {len(split['shards'])} shards"
                       for name, split in manifest["splits"].items())
    print(f"packed {args.data_dir} into {args.dest}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
