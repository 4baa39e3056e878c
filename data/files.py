"""Writing files so that readers never see half of one: temp name beside it, then rename."""
from __future__ import annotations

import os
import shutil
import tempfile


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`. File names that
    are not valid UTF-8 (surrogate escapes, e.g. in a data report) are written as \\udcXX."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def staging_dir_for(dest: str, prefix: str) -> str:
    """A new empty folder beside `dest`, on the same file system, to build `dest` in."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def publish_staged_dataset(staging: str, dest: str, counts: dict[str, int]) -> None:
    """Mark a dataset built in `staging` complete and move it to `dest` (replacing it)."""
    with open(os.path.join(staging, ".complete"), "w") as f:
        f.write(f"{counts}\n")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.replace(staging, dest)
