"""The dataset check: what is in a ``DATA_DIR/<split>/<CLASS NAME>/<image>`` folder, and which
files training can read.

    python -m data.check --data_dir=DIR [--skip_unknown_classes] [--on_bad_file=skip|fail]
                         [--max_image_pixels=N] [--json=PATH] [--no_cache]

prints, per split: classes, readable images per class (min/median/max), image sizes and formats
seen, classes present in one split and not another, every file left out with its reason, then the
errors that would stop training and the warnings. Exit code 0 when training could start with the
given options, 1 when not, 2 for a usage error. The trainer runs the same `scan` before it builds
anything, trains only on the files that passed, and writes the report to
``model_dir/data_report.txt`` and ``.json``.

Every candidate image is decoded by `data.decode.decode_rgb` and resized by
`data.decode.resize_uint8`, the functions training uses, in TensorFlow: a file that passes here
decodes in training, so a bad file can never stop an epoch. Results are cached per file (keyed by
path, size and modification time, and by the TensorFlow version) in ``DATA_DIR/.check_cache.json``,
or in the model_dir when the dataset folder is read-only, so a second start on unchanged files
only lists and stats them.

What is ignored (listed, never read): hidden files and folders (``.DS_Store``), files whose name
is not an image name (``.jpg .jpeg .png .gif .bmp``), files at the dataset root (``birds.csv``)
or directly in a split folder, root folders other than train/valid/test, and sub-folders of a
class folder. What is left out as a bad file: empty files, truncated or corrupt images, HTML or
text pages named ``.jpg``, formats TensorFlow cannot decode (TIFF, 1-bit BMP), and images whose
header states more than ``--max_image_pixels`` pixels (data/pixels.py: never decoded, so a small
file that decodes to a huge image cannot exhaust memory).

This module never imports absl (data/ is below the trainer).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import re
import statistics
import sys

from data import layout, pixels
from data.files import atomic_write_text
from data.progress import Progress

SPLITS = ("train", "valid", "test")
REQUIRED_SPLITS = ("train", "valid")
ON_BAD_FILE = ("skip", "fail")
CACHE_NAME = ".check_cache.json"
CACHE_VERSION = 2  # 2: each file's perceptual hash and byte fingerprint
HASH_SIDE = 16  # the difference hash compares a 16x17 grey thumbnail: 256 bits
HASH_BITS = HASH_SIDE * HASH_SIDE
# A bit is set where the right neighbour is darker by more than FLAT grey levels: in flat areas
# (sky) JPEG noise would otherwise flip bits at random. Difference hashes at most
# NEAR_DUPLICATE_BITS apart are near duplicates. Measured on data/photos.py images at 160 px:
# copies resized by 0.5x-1.5x and re-encoded all lie within 12 bits; 55 of 28,680 pairs of
# distinct crops do too (crops of one flat region). 64-bit hashes (8x9) cannot tell small
# images apart, and without FLAT a 0.5x copy lay up to 44 bits away.
FLAT = 1.0
NEAR_DUPLICATE_BITS = 12
REPORT_NAME = "data_report"
_EXTENSION_FORMAT = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".gif": "gif", ".bmp": "bmp"}
_TEXT_LIST_LIMIT = 50  # ignored files / misnamed files shown per split in the text report


@dataclasses.dataclass(frozen=True)
class FileStatus:
    """What decoding one file gave: readable (with its size and format) or a reason."""
    ok: bool
    width: int = 0
    height: int = 0
    format: str = ""  # sniffed from the bytes: jpeg, png, gif, bmp, webp, jxl, tiff, html, ...
    reason: str = ""
    dhash: str = ""  # 256-bit difference hash of the decoded pixels (hex): near duplicates
    digest: str = ""  # 64-bit fingerprint of the file's bytes (hex): exact duplicates

    def to_list(self) -> list:
        return [self.ok, self.width, self.height, self.format, self.reason, self.dhash,
                self.digest]


@dataclasses.dataclass
class SplitReport:
    name: str
    classes: dict[str, int]  # class folder -> readable images, in folder order
    bad_files: list[tuple[str, str]]  # (path relative to data_dir, reason)
    ignored: list[tuple[str, str]]  # (path relative to data_dir, reason)
    sizes: dict[str, int]  # "WxH" -> readable images of that size
    formats: dict[str, int]  # format -> readable images
    misnamed: list[tuple[str, str]]  # (path, real format) of readable files named as another
    renamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (folder, train)
    unknown_classes: list[str] = dataclasses.field(default_factory=list)  # not in train
    missing_classes: list[str] = dataclasses.field(default_factory=list)  # train, not here

    @property
    def num_images(self) -> int:
        return sum(self.classes.values())

    def per_class(self) -> dict | None:
        if not self.classes:
            return None
        counts = sorted(self.classes.items(), key=lambda item: (item[1], item[0]))
        return {"min": counts[0][1], "min_class": counts[0][0],
                "median": statistics.median(self.classes.values()),
                "max": counts[-1][1], "max_class": counts[-1][0]}


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """Two readable files: the same bytes (`exact`), or pixels whose difference hashes are at
    most NEAR_DUPLICATE_BITS of HASH_BITS apart (`near`: resized, re-encoded, recoloured)."""
    kind: str
    distance: int  # bits between the difference hashes
    first: str  # paths relative to data_dir, first < second
    second: str

    @property
    def splits(self) -> tuple[str, str]:
        return self.first.split("/", 1)[0], self.second.split("/", 1)[0]

    @property
    def leaks(self) -> bool:
        """Across splits: an image of valid or test that training also sees (or valid = test)."""
        return self.splits[0] != self.splits[1]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "distance": self.distance, "files": [self.first, self.second],
                "splits": list(self.splits)}

    def line(self) -> str:
        how = "same bytes" if self.kind == "exact" else f"near, {self.distance} bits apart"
        return f"{self.first} <-> {self.second} ({how})"


def find_duplicates(statuses: dict[str, FileStatus],
                    max_bits: int = NEAR_DUPLICATE_BITS) -> list[Duplicate]:
    """Every pair of readable files with the same bytes or difference hashes at most `max_bits`
    apart; pairs across splits first. Near pairs by multi-index hashing: the bits cut into
    max_bits + 1 bands; hashes that close agree on at least one whole band, so only files
    sharing a band's value are compared (not all N^2 pairs)."""
    rels = sorted(rel for rel, status in statuses.items() if status.ok and status.dhash)
    pairs: dict[tuple[str, str], Duplicate] = {}
    by_digest = collections.defaultdict(list)
    for rel in rels:
        by_digest[statuses[rel].digest].append(rel)
    for group in by_digest.values():
        for a, b in itertools.combinations(group, 2):
            pairs[a, b] = Duplicate("exact", 0, a, b)
    values = [int(statuses[rel].dhash, 16) for rel in rels]
    bands = max_bits + 1
    width = -(-HASH_BITS // bands)
    for band in range(bands):
        buckets = collections.defaultdict(list)
        for i, value in enumerate(values):
            buckets[(value >> (band * width)) & ((1 << width) - 1)].append(i)
        for members in buckets.values():
            for x, y in itertools.combinations(members, 2):
                key = (rels[x], rels[y])
                distance = bin(values[x] ^ values[y]).count("1")
                if key not in pairs and distance <= max_bits:
                    pairs[key] = Duplicate("near", distance, *key)
    return sorted(pairs.values(), key=lambda d: (not d.leaks, d.kind != "exact", d.first,
                                                 d.second))


@dataclasses.dataclass
class Report:
    data_dir: str
    splits: dict[str, SplitReport]
    ignored: list[tuple[str, str]]  # at the dataset root
    errors: list[str]  # each stops training
    warnings: list[str]
    decoded: int  # files decoded now
    cached: int  # files whose result came from the cache
    duplicates: list[Duplicate] = dataclasses.field(default_factory=list)

    @property
    def leaks(self) -> list[Duplicate]:
        return [d for d in self.duplicates if d.leaks]

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        return [bad for split in self.splits.values() for bad in split.bad_files]

    def error_line(self, report_path: str | None = None) -> str:
        """The first error as one line, with the count of the others and where they are listed."""
        line = self.errors[0]
        more = len(self.errors) - 1
        if more:
            line += f" (and {more} more problem{'s' if more > 1 else ''}"
            line += f"; see {report_path})" if report_path else ")"
        elif report_path:
            line += f" (report: {report_path})"
        return line

    def to_dict(self) -> dict:
        splits = {}
        for name, split in self.splits.items():
            splits[name] = {
                "classes": len(split.classes), "images": split.num_images,
                "images_per_class": split.classes, "per_class": split.per_class(),
                "sizes": split.sizes, "formats": split.formats,
                "bad_files": [{"path": p, "reason": r} for p, r in split.bad_files],
                "ignored": [{"path": p, "reason": r} for p, r in split.ignored],
                "named_as_another_format": [{"path": p, "format": f} for p, f in split.misnamed],
                "matched_after_folding": [{"folder": f, "train_class": t}
                                          for f, t in split.renamed],
                "classes_not_in_train": split.unknown_classes,
                "train_classes_missing": split.missing_classes,
            }
        return {"data_dir": self.data_dir, "splits": splits,
                "ignored": [{"path": p, "reason": r} for p, r in self.ignored],
                "errors": self.errors, "warnings": self.warnings,
                "duplicates": [d.to_dict() for d in self.duplicates],
                "leakage_pairs": len(self.leaks),
                "files_decoded": self.decoded, "files_from_cache": self.cached}

    def to_text(self) -> str:
        lines = [f"Dataset check of {self.data_dir}"]
        if self.ignored:
            lines.append(f"ignored at the dataset root ({len(self.ignored)}):")
            lines += [f"  {p}: {r}" for p, r in self.ignored]
        for name, split in self.splits.items():
            lines.append("")
            per_class = split.per_class()
            head = f"{name}: {len(split.classes)} classes, {split.num_images} readable images"
            if per_class:
                head += (f"; per class min {per_class['min']} ({per_class['min_class']!r}), "
                         f"median {per_class['median']:g}, max {per_class['max']} "
                         f"({per_class['max_class']!r})")
            lines.append(head)
            if split.sizes:
                sizes = sorted(split.sizes.items(), key=lambda item: -item[1])
                shown = ", ".join(f"{size} ({count})" for size, count in sizes[:10])
                if len(sizes) > 10:
                    shown += f", and {len(sizes) - 10} other sizes"
                lines.append(f"  image sizes (width x height): {shown}")
            if split.formats:
                lines.append("  formats: " + ", ".join(
                    f"{f} ({n})" for f, n in sorted(split.formats.items(), key=lambda i: -i[1])))
            for folder, train_name in split.renamed:
                lines.append(f"  class folder {folder!r} is train class {train_name!r} "
                             f"(differs only by whitespace or case)")
            if split.unknown_classes:
                lines.append("  class folders not in train: "
                             + ", ".join(map(repr, split.unknown_classes)))
            if split.missing_classes:
                lines.append(f"  train classes with no folder here ({len(split.missing_classes)}):"
                             f" " + ", ".join(map(repr, split.missing_classes)))
            empty = [c for c, n in split.classes.items() if n == 0]
            if empty:
                lines.append("  classes with no readable image: " + ", ".join(map(repr, empty)))
            if split.bad_files:
                lines.append(f"  bad files, left out ({len(split.bad_files)}):")
                lines += [f"    {p}: {r}" for p, r in split.bad_files]
            _append_capped(lines, f"  images named as another format, decoded by their content "
                                  f"({len(split.misnamed)}):",
                           [f"    {p}: {f}" for p, f in split.misnamed])
            _append_capped(lines, f"  ignored ({len(split.ignored)}):",
                           [f"    {p}: {r}" for p, r in split.ignored])
        lines.append("")
        lines += self._duplicate_lines()
        lines.append(f"errors ({len(self.errors)}):" if self.errors else "errors: none")
        lines += [f"  {e}" for e in self.errors]
        lines.append(f"warnings ({len(self.warnings)}):" if self.warnings else "warnings: none")
        lines += [f"  {w}" for w in self.warnings]
        lines.append(f"({self.decoded} files decoded, {self.cached} taken from the cache)")
        return "\n".join(lines) + "\n"

    def _duplicate_lines(self) -> list[str]:
        if not self.duplicates:
            return [f"duplicates: none (same bytes, or difference hashes within "
                    f"{NEAR_DUPLICATE_BITS} of {HASH_BITS} bits)", ""]
        exact = sum(d.kind == "exact" for d in self.duplicates)
        lines = [f"duplicates: {len(self.duplicates)} pairs ({exact} same bytes, "
                 f"{len(self.duplicates) - exact} near: difference hashes within "
                 f"{NEAR_DUPLICATE_BITS} of {HASH_BITS} bits)"]
        within = [d for d in self.duplicates if not d.leaks]
        _append_capped(lines, f"  across splits, train/valid/test leakage ({len(self.leaks)}):",
                       [f"    {d.line()}" for d in self.leaks])
        _append_capped(lines, f"  within a split ({len(within)}):",
                       [f"    {d.line()}" for d in within])
        return lines + [""]

    def write(self, directory: str) -> str:
        """Write REPORT_NAME.txt and .json into `directory` (atomically); returns the .txt path."""
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, REPORT_NAME)
        atomic_write_text(base + ".json", json.dumps(self.to_dict(), indent=1))
        atomic_write_text(base + ".txt", self.to_text())
        return base + ".txt"


def _append_capped(lines: list[str], head: str, items: list[str]) -> None:
    if items:
        lines.append(head)
        lines += items[:_TEXT_LIST_LIMIT]
        if len(items) > _TEXT_LIST_LIMIT:
            lines.append(f"    ... and {len(items) - _TEXT_LIST_LIMIT} more (all in the .json)")


@dataclasses.dataclass
class ScanResult:
    class_names: list[str]
    splits: dict[str, layout.SplitFiles]  # readable files only, labelled by `class_names`
    report: Report
    # path relative to data_dir -> (size in bytes, 64-bit fingerprint of the bytes) of every
    # readable file: what data/fingerprint.py keeps of a run's data
    file_info: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)


# ============================================================================================
# Listing: which files are candidates, which are ignored
# ============================================================================================
@dataclasses.dataclass
class _Listing:
    classes: dict[str, list[str]]  # class folder -> candidate image paths (relative to data_dir)
    ignored: list[tuple[str, str]]
    unreadable: list[str]  # errors


def _entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the file system (surrogate escapes)
        return False
    return True


def _list_root(data_dir: str, skip: set[str]) -> list[tuple[str, str]]:
    ignored = []
    for entry in _entries(data_dir):
        if entry.name in skip or entry.name.startswith(".tmp-"):
            continue
        if entry.is_dir():
            if entry.name.startswith("."):
                ignored.append((entry.name + "/", "hidden folder"))
            elif entry.name not in SPLITS:
                ignored.append((entry.name + "/", "folder at the dataset root other than "
                                                  "train/, valid/, test/"))
        elif entry.name.startswith("."):
            ignored.append((entry.name, "hidden file"))
        else:
            ignored.append((entry.name, "file at the dataset root (not in a split)"))
    return ignored


def _list_split(data_dir: str, split: str) -> _Listing:
    listing = _Listing({}, [], [])
    for entry in _entries(os.path.join(data_dir, split)):
        rel = f"{split}/{entry.name}"
        if entry.name.startswith("."):
            listing.ignored.append((rel, "hidden " + ("folder" if entry.is_dir() else "file")))
        elif not entry.is_dir():
            listing.ignored.append((rel, "file directly in the split folder (not in a class "
                                         "folder)"))
        elif not _is_utf8(entry.name):
            listing.unreadable.append(f"class folder {rel!r}: the name is not valid UTF-8, "
                                      f"which TensorFlow needs (rename it)")
        else:
            try:
                children = _entries(entry.path)
            except OSError as e:
                listing.unreadable.append(f"cannot read class folder {rel!r}: "
                                          f"{e.strerror or e}")
                continue
            files = listing.classes.setdefault(entry.name, [])
            for child in children:
                child_rel = f"{rel}/{child.name}"
                if child.name.startswith("."):
                    listing.ignored.append((child_rel, "hidden " + (
                        "folder" if child.is_dir() else "file")))
                elif child.is_dir():
                    listing.ignored.append((child_rel + "/", "folder inside a class folder "
                                                             "(not read)"))
                elif not layout.is_image_file(child.name):
                    ext = os.path.splitext(child.name)[1] or "no extension"
                    listing.ignored.append((child_rel, f"not an image file name ({ext})"))
                else:
                    files.append(child_rel)
    return listing


# ============================================================================================
# Decoding, with a cache keyed on (path, size, mtime) and the TensorFlow version
# ============================================================================================
def default_cache_path(data_dir: str, fallback_dir: str | None = None) -> str | None:
    """DATA_DIR/.check_cache.json when the dataset folder is writable, else in `fallback_dir`."""
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, CACHE_NAME)
    return os.path.join(fallback_dir, CACHE_NAME) if fallback_dir else None


def _decoder_id() -> str:
    """The TensorFlow release, read from the installed package: a scan whose files are all in the
    cache never imports TensorFlow."""
    import importlib.metadata
    for name in ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{name} {importlib.metadata.version(name)}"
    import tensorflow as tf
    return f"tensorflow {tf.__version__}"


def _load_cache(path: str | None, decoder: str) -> dict[str, list]:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") == CACHE_VERSION and data.get("decoder") == decoder:
            return dict(data["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # a corrupt or foreign cache is rebuilt
    return {}


def _save_cache(path: str | None, decoder: str, files: dict[str, list]) -> None:
    if not path:
        return
    try:
        atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "decoder": decoder,
                                        "files": files}))
    except OSError:
        pass  # a read-only place: the next scan decodes again


def sniff_format(head: bytes) -> str:
    """The format of a file from its first bytes (at least 16, ideally 512)."""
    if not head:
        return "empty"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "jxl"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) \
            or b"<html" in text:
        return "html"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"
    return "unknown"


def _clean_tf_message(message: str) -> str:
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message.splitlines()[0] if message else "")
    return re.sub(r"\s*\[Op:\w+\].*$", "", message).strip() or "decode failed"


def _reason(path: str, tf_message: str) -> tuple[str, str]:
    """(format, reason) of a file TensorFlow could not decode."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(max(0, size - 2))
            tail = f.read(2)
    except OSError as e:
        return "unreadable", f"cannot read the file: {e.strerror or e}"
    fmt = sniff_format(head)
    if fmt == "empty":
        return fmt, "empty file (0 bytes)"
    if fmt == "html":
        return fmt, "HTML page, not an image (an error page saved by a failed download?)"
    if fmt == "text":
        return fmt, "text file, not an image"
    if fmt == "unknown":
        return fmt, "not an image (content of no known image format)"
    if fmt == "tiff":
        return fmt, "TIFF image: TensorFlow cannot decode TIFF"
    if fmt == "jpeg" and tail != b"\xff\xd9":
        return fmt, "truncated JPEG (the file ends before the JPEG end marker)"
    return fmt, f"corrupt or unsupported {fmt.upper()}: {tf_message}"


@contextlib.contextmanager
def _quiet_native_stderr():
    """TensorFlow's decoders print lines such as "Premature end of JPEG data" on stderr for every
    bad file (not all through TF_CPP_MIN_LOG_LEVEL); the report states each failure itself. Kept
    when TF_CPP_MIN_LOG_LEVEL=0 (all logs wanted)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _probe_fn():
    import tensorflow as tf
    from data import decode

    def probe(path):
        data = tf.io.read_file(path)
        image = decode.decode_rgb(data)
        # The resize training applies next; sums to keep it from being pruned.
        check = tf.reduce_sum(tf.cast(decode.resize_uint8(image, 8), tf.int32))
        shape = tf.shape(image)
        return shape[0], shape[1], check, difference_hash_bits(image), \
            tf.strings.to_hash_bucket_fast(data, 2 ** 63 - 1)
    return probe


def difference_hash_bits(image):
    """dHash: the grey image shrunk to HASH_SIDE x (HASH_SIDE + 1), each pixel compared with its
    right neighbour: HASH_BITS bools that survive resizing, re-encoding and small colour
    changes."""
    import tensorflow as tf
    grey = tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))
    small = tf.image.resize(grey, [HASH_SIDE, HASH_SIDE + 1], method="area")[:, :, 0]
    return tf.reshape(small[:, 1:] > small[:, :-1] + FLAT, [HASH_BITS])


def _hex(bits) -> str:
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{HASH_BITS // 4}x}"


def decode_status(paths: list[str], log=None) -> list[FileStatus]:
    """Decode every file with the training decoder; a FileStatus per path, in order; progress
    lines to `log` when it takes a while."""
    if not paths:
        return []
    progress = Progress("data check", len(paths), log)
    shapes: dict[int, tuple[int, int]] = {}
    with _quiet_native_stderr():  # also TensorFlow's import-time lines, when it loads here
        import tensorflow as tf
        probe = _probe_fn()
        ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64),
                                                 tf.constant(paths)))
        ds = ds.map(lambda i, p: (i, *probe(p)), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=False)
        ds = ds.ignore_errors(log_warning=False).batch(1024)
        hashes: dict[int, tuple[str, str]] = {}
        for index, height, width, _, bits, digest in ds.as_numpy_iterator():
            shapes.update(zip(index.tolist(), zip(height.tolist(), width.tolist())))
            hashes.update((i, (_hex(b), f"{d:016x}")) for i, b, d in zip(index.tolist(), bits,
                                                                          digest.tolist()))
            progress.update(len(index))
        progress.close()
        results = []
        for i, path in enumerate(paths):
            message = ""
            if i not in shapes:  # failed in the pipeline: decode alone for the reason
                try:
                    height, width, _, bits, digest = probe(tf.constant(path))
                    shapes[i] = (int(height), int(width))
                    hashes[i] = (_hex(bits.numpy()), f"{int(digest):016x}")
                except tf.errors.OpError as e:
                    message = _clean_tf_message(e.message)
            head = b""
            with contextlib.suppress(OSError), open(path, "rb") as f:
                head = f.read(512)
            if i in shapes and min(shapes[i]) > 0:
                height, width = shapes[i]
                results.append(FileStatus(True, width, height, sniff_format(head),
                                          dhash=hashes[i][0], digest=hashes[i][1]))
            elif i in shapes:
                results.append(FileStatus(False, format=sniff_format(head),
                                          reason="image has no pixels (0 width or height)"))
            else:
                fmt, reason = _reason(path, message)
                results.append(FileStatus(False, format=fmt, reason=reason))
    return results


def _within_limit(status: FileStatus, max_pixels: int | None) -> FileStatus:
    """A cached readable file over a (now lower) --max_image_pixels becomes a bad file; the
    cache keeps what decoding gave, for a later higher limit."""
    if status.ok and max_pixels and status.width * status.height > max_pixels:
        return FileStatus(False, status.width, status.height, status.format,
                          pixels.describe_over_limit(status.width, status.height, max_pixels))
    return status


def _statuses(data_dir: str, rel_paths: list[str], cache_path: str | None,
              log, max_pixels: int | None = None
              ) -> tuple[dict[str, FileStatus], int, int, dict[str, int]]:
    """Each file's status (from the cache, or decoded; files whose header states more than
    `max_pixels` are never decoded), the counts decoded and cached, and each file's size."""
    decoder = _decoder_id()
    cache = _load_cache(cache_path, decoder)
    entries, todo, stats, hits, over = {}, [], {}, 0, set()
    for rel in rel_paths:
        if not _is_utf8(rel):
            entries[rel] = FileStatus(False, format="unreadable", reason=(
                "the file name is not valid UTF-8, which TensorFlow needs (rename it)"))
            continue
        try:
            st = os.stat(os.path.join(data_dir, rel))
            stats[rel] = [st.st_size, st.st_mtime_ns]
        except OSError as e:
            entries[rel] = FileStatus(False, format="unreadable",
                                      reason=f"cannot read the file: {e.strerror or e}")
            continue
        hit = cache.get(rel)
        if hit and hit[:2] == stats[rel]:
            entries[rel] = _within_limit(FileStatus(*hit[2:]), max_pixels)
            hits += 1
        elif reason := pixels.over_limit(os.path.join(data_dir, rel), max_pixels):
            # Not decoded, and not cached: a higher limit later decodes it.
            entries[rel] = FileStatus(False, format=sniff_format(_head(data_dir, rel)),
                                      reason=reason)
            over.add(rel)
        else:
            todo.append(rel)
    if todo and log and len(todo) >= 1000:
        log(f"data check: decoding {len(todo)} images not in the cache "
            f"({hits} cached)...")
    for rel, status in zip(todo, decode_status([os.path.join(data_dir, r) for r in todo], log)):
        entries[rel] = status
    decoded_now = set(todo)
    new_cache = {rel: stats[rel] + (entries[rel].to_list() if rel in decoded_now
                                    else cache[rel][2:])
                 for rel in rel_paths if rel in stats and rel not in over}
    if todo or set(new_cache) != set(cache):
        _save_cache(cache_path, decoder, new_cache)
    return entries, len(todo), hits, {rel: st[0] for rel, st in stats.items()}


def _head(data_dir: str, rel: str) -> bytes:
    with contextlib.suppress(OSError), open(os.path.join(data_dir, rel), "rb") as f:
        return f.read(512)
    return b""


# ============================================================================================
# The scan
# ============================================================================================
def _read_split(data_dir: str, split: str, listing, statuses: dict, class_names: list[str],
                label_by_key: dict) -> tuple[SplitReport, list[str], list[int]]:
    """A split's report, and its readable files of known classes with their labels."""
    report = SplitReport(split, {}, [], listing.ignored, collections.Counter(),
                         collections.Counter(), [])
    files, labels, seen_labels = [], [], set()
    for folder, rels in listing.classes.items():
        label = label_by_key.get(layout.class_key(folder))
        if label is None:
            report.unknown_classes.append(folder)
        elif folder != class_names[label]:
            report.renamed.append((folder, class_names[label]))
        good = 0
        for rel in rels:
            status = statuses[rel]
            if not status.ok:
                report.bad_files.append((rel, status.reason))
                continue
            good += 1
            report.sizes[f"{status.width}x{status.height}"] += 1
            report.formats[status.format] += 1
            named = _EXTENSION_FORMAT.get(os.path.splitext(rel)[1].lower())
            if named != status.format:
                report.misnamed.append((rel, status.format))
            if label is not None:
                files.append(os.path.join(data_dir, rel))
                labels.append(label)
        report.classes[folder] = good
        if label is not None and good:
            seen_labels.add(label)
    report.sizes, report.formats = dict(report.sizes), dict(report.formats)
    report.missing_classes = [name for i, name in enumerate(class_names)
                              if i not in seen_labels and
                              not any(layout.class_key(f) == layout.class_key(name)
                                      for f in listing.classes)]
    return report, files, labels


def _split_findings(data_dir: str, report: SplitReport, has_files: bool,
                    skip_unknown_classes: bool) -> tuple[list[str], list[str]]:
    """The errors (that stop training) and warnings a split's report gives."""
    split, errors, warnings = report.name, [], []
    for folder, train_name in report.renamed:
        warnings.append(f"{split} class folder {folder!r} taken as train class "
                        f"{train_name!r} (they differ only by whitespace or case)")
    if report.unknown_classes:
        names = ", ".join(map(repr, report.unknown_classes))
        unknown_images = sum(report.classes[c] for c in report.unknown_classes)
        if skip_unknown_classes:
            warnings.append(f"split {split!r}: {unknown_images} images of class folder(s) "
                            f"not in train left out (--skip_unknown_classes): {names}")
        else:
            errors.append(f"split {split!r} has class folder(s) not in train: {names} "
                          f"(labels come from train; pass --skip_unknown_classes to leave "
                          f"those images out)")
    empty = [c for c, n in report.classes.items() if n == 0]
    if not has_files:
        errors.append(f"split {split!r} in {data_dir!r} holds no readable images")
    elif split == "train" and empty:
        errors.append(f"train class(es) with no readable image: {', '.join(map(repr, empty))}"
                      f" (a class needs training images: fix or remove the folder)")
    elif empty:
        warnings.append(f"{split} class(es) with no readable image: "
                        f"{', '.join(map(repr, empty))}")
    if split != "train" and report.missing_classes:
        warnings.append(f"split {split!r} has no images of {len(report.missing_classes)} "
                        f"train class(es): {', '.join(map(repr, report.missing_classes))}")
    return errors, warnings


def _class_names(data_dir: str, class_names: list[str] | None) -> list[str]:
    """`class_names`, or the train folder names; a missing dataset, or a missing train split
    when the classes would come from it, is a LayoutError."""
    if not os.path.isdir(data_dir):
        raise layout.LayoutError(f"--data_dir={data_dir}: no such folder")
    if not os.path.isdir(os.path.join(data_dir, "train")):
        if class_names is None:  # the classes come from train
            raise layout.LayoutError(f"--data_dir={data_dir}: has no train/ split folder")
    else:
        layout.train_class_names(data_dir)  # raises on two train folders for one class
    return list(class_names or layout.train_class_names(data_dir))


def _report_bad_files(bad: list, on_bad_file: str, errors: list[str],
                      warnings: list[str]) -> None:
    """--on_bad_file=fail: the bad files stop training (first error); skip: one warning."""
    if bad and on_bad_file == "fail":
        shown = "; ".join(f"{p!r}: {r}" for p, r in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        errors.insert(0, f"--on_bad_file=fail: {len(bad)} bad image file(s): {shown}{more}")
    elif bad:
        warnings.append(f"{len(bad)} bad image file(s) left out (--on_bad_file=skip); each is "
                        f"listed with its reason in the data report")


def scan(data_dir: str, class_names: list[str] | None = None, *,
         skip_unknown_classes: bool = False, on_bad_file: str = "skip",
         cache_path: str | None = None, log=None,
         max_image_pixels: int | None = pixels.DEFAULT_MAX_IMAGE_PIXELS) -> ScanResult:
    """Scan `data_dir`: the readable files of each split, labelled by name from `class_names`
    (default: the train folder names), and the report. Problems that stop training are in
    `report.errors` (the caller decides); a missing dataset, or a missing train split when
    `class_names` is not given, raises LayoutError. Files whose header states more than
    `max_image_pixels` pixels are bad files, never decoded (data/pixels.py)."""
    if on_bad_file not in ON_BAD_FILE:
        raise ValueError(f"on_bad_file must be one of {ON_BAD_FILE}, not {on_bad_file!r}")
    class_names = _class_names(data_dir, class_names)
    label_by_key = {layout.class_key(name): i for i, name in enumerate(class_names)}
    own = {os.path.basename(cache_path)} if cache_path and \
        os.path.dirname(os.path.abspath(cache_path)) == os.path.abspath(data_dir) else set()
    root_ignored = _list_root(data_dir, own)
    listings = {split: _list_split(data_dir, split) for split in SPLITS
                if os.path.isdir(os.path.join(data_dir, split))}
    candidates = [rel for listing in listings.values() for files in listing.classes.values()
                  for rel in files]
    statuses, decoded, cached, sizes = _statuses(data_dir, candidates, cache_path, log,
                                                 max_image_pixels)

    errors = [f"--data_dir={data_dir}: has no {split}/ split folder"
              for split in REQUIRED_SPLITS if split not in listings]
    warnings: list[str] = []
    reports, split_files = {}, {}
    for split, listing in listings.items():
        errors += listing.unreadable
        report, files, labels = _read_split(data_dir, split, listing, statuses, class_names,
                                            label_by_key)
        problems, notes = _split_findings(data_dir, report, bool(files), skip_unknown_classes)
        errors += problems
        warnings += notes
        reports[split] = report
        split_files[split] = layout.SplitFiles(split, tuple(files), tuple(labels),
                                               tuple(report.renamed),
                                               tuple(report.unknown_classes))
    _report_bad_files([b for r in reports.values() for b in r.bad_files], on_bad_file,
                      errors, warnings)
    duplicates = find_duplicates(statuses)
    leaks = sum(d.leaks for d in duplicates)
    if leaks:
        warnings.append(f"{leaks} image pair(s) in two splits (train/valid/test leakage: the "
                        f"same or a near-identical image); the pairs are listed under "
                        f"duplicates in the data report")
    report = Report(os.path.abspath(data_dir), reports, root_ignored, errors, warnings,
                    decoded, cached, duplicates)
    file_info = {rel: (sizes[rel], status.digest) for rel, status in statuses.items()
                 if status.ok}
    return ScanResult(class_names, split_files, report, file_info)


# ============================================================================================
# Command line
# ============================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.check",
        description="Check a train/valid/test image dataset and report what training would use.")
    parser.add_argument("--data_dir", required=True, help="dataset root (train/, valid/, test/)")
    parser.add_argument("--skip_unknown_classes", action="store_true",
                        help="as the trainer flag: valid/test classes not in train are left out")
    parser.add_argument("--on_bad_file", choices=ON_BAD_FILE, default="skip",
                        help="as the trainer flag: skip bad files (default) or count them as an "
                             "error")
    parser.add_argument("--max_image_pixels", type=int, default=pixels.DEFAULT_MAX_IMAGE_PIXELS,
                        help="as the trainer flag: images whose header states more pixels are "
                             "bad files, never decoded (default: %(default)s; 0: no limit)")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    parser.add_argument("--no_cache", action="store_true",
                        help=f"decode every file; do not read or write DATA_DIR/{CACHE_NAME}")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from data import manifest
    if manifest.is_packed(args.data_dir):  # checked when packed: its report, and the shards now
        try:
            manifest.verify_shards(manifest.read_manifest(args.data_dir))
        except manifest.DataError as e:
            print(f"data.check: {e}", file=sys.stderr)
            return 1
        with open(os.path.join(args.data_dir, REPORT_NAME + ".txt"), encoding="utf-8") as f:
            sys.stdout.write(f.read())
        print(f"(packed data: the check ran when {args.data_dir} was packed; every shard "
              f"matches its manifest)")
        return 0
    cache_path = None if args.no_cache else default_cache_path(args.data_dir)
    try:
        result = scan(args.data_dir, skip_unknown_classes=args.skip_unknown_classes,
                      on_bad_file=args.on_bad_file, cache_path=cache_path,
                      log=lambda m: print(m, file=sys.stderr, flush=True),
                      max_image_pixels=args.max_image_pixels)
    except layout.LayoutError as e:
        print(f"data.check: {e}", file=sys.stderr)
        return 1
    text = result.report.to_text()
    sys.stdout.write(text.encode(sys.stdout.encoding or "utf-8", "backslashreplace").decode(
        sys.stdout.encoding or "utf-8"))
    if args.json:
        atomic_write_text(args.json, json.dumps(result.report.to_dict(), indent=1))
    return 1 if result.report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
