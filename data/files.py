"""Writing files so that readers never see half of one: temp name beside it, then rename.

Every publishing rename here comes after the file (or the staged folder's every file and
folder) is fsynced, and the folder holding the new name is fsynced after it, so that a power
loss leaves the old version or the whole new one. Files and folders get the modes the umask
allows (0644 and 0755 under umask 022), not the 0600/0700 of `tempfile`'s private names.
"""
from __future__ import annotations

import os
import shutil
import tempfile


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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
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


def publish_staged_dataset(staging: str, dest: str, counts: dict[str, int]) -> None:
    """Mark a dataset built in `staging` complete, fsync it and move it to `dest` (replacing
    it)."""
    with open(os.path.join(staging, ".complete"), "w") as f:
        f.write(f"{counts}\n")
    fsync_tree(staging)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.replace(staging, dest)
    fsync_path(os.path.dirname(os.path.abspath(dest)))
