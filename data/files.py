"""Writing files so that readers never see half of one: temp name beside it, then rename.

Every publishing rename here comes after the file (or the staged folder's every file and
folder) is fsynced, and the folder holding the new name is fsynced after it, so that a power
loss leaves the old version or the whole new one. Files and folders get the modes the umask
allows (0644 and 0755 under umask 022), not the 0600/0700 of `tempfile`'s private names.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

DATASET_MARKER = ".complete"  # written last into a dataset built here (publish_staged_dataset)


class FolderError(ValueError):
    """A destination folder holds files its writer did not write; str() is one line."""


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc); else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def fsync_path(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and folder under `root`, and `root` itself."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path` and fsync
    the folder. File names that are not valid UTF-8 (surrogate escapes, e.g. in a data report)
    are written as \\udcXX. The file's mode is what the umask allows (0644 under 022)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(directory)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path  # a write's ENOSPC names no file: the line must say which
        raise


def make_staging_dir(parent: str, prefix: str) -> str:
    """A new empty folder in `parent` with the mode the umask allows (mkdtemp's is 0700)."""
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(staging, dir_mode())
    return staging


def staging_dir_for(dest: str, prefix: str) -> str:
    """A new empty folder beside `dest`, on the same file system, to build `dest` in."""
    return make_staging_dir(os.path.dirname(os.path.abspath(dest)), prefix)


def _relative_files(root: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(found)


def foreign_files(dest: str) -> list[str]:
    """Files under `dest` that no publish_staged_dataset wrote: all of them when `dest` has no
    marker; those its marker does not list otherwise (a marker from before the list, which
    held only the counts, vouches for the whole tree)."""
    if not os.path.isdir(dest):
        return []
    present = [p for p in _relative_files(dest) if p != DATASET_MARKER]
    try:
        with open(os.path.join(dest, DATASET_MARKER)) as f:
            text = f.read()
    except OSError:
        return present
    try:
        written = json.loads(text).get("files")
    except (ValueError, AttributeError):
        return []  # the old marker: "{'train': N, ...}"
    return sorted(set(present) - set(written or []))


def check_replaceable(dest: str, option: str = "--dest") -> None:
    """Raise FolderError (one line) unless `dest` is missing, empty, or a dataset published
    here holding only the files it wrote: a rebuild never deletes anyone else's files."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise FolderError(f"{option}={dest}: exists and is not a folder")
    foreign = foreign_files(dest)
    if foreign:
        marker = os.path.exists(os.path.join(dest, DATASET_MARKER))
        raise FolderError(
            f"{option}={dest}: holds {len(foreign)} file(s) this builder did not write (e.g. "
            f"{foreign[0]}){'' if marker else f'; no {DATASET_MARKER} marker'}; nothing was "
            f"changed: choose another {option} or move those files away")


def publish_staged_dataset(staging: str, dest: str, counts: dict[str, int]) -> None:
    """Mark a dataset built in `staging` complete (the marker lists its files), fsync it and
    move it to `dest`. An existing `dest` is replaced only if check_replaceable allows it: its
    old files are moved aside first and removed after the swap (they were all written here)."""
    check_replaceable(dest)
    marker = {"counts": counts, "files": _relative_files(staging)}
    with open(os.path.join(staging, DATASET_MARKER), "w") as f:
        json.dump(marker, f)
    fsync_tree(staging)
    parent = os.path.dirname(os.path.abspath(dest))
    old = None
    if os.path.isdir(dest):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(dest, os.path.join(old, "dataset"))
    os.replace(staging, dest)
    fsync_path(parent)
    if old:
        shutil.rmtree(old)
