"""Waiting for a file to appear without busy polling: Linux inotify through ctypes.

A test that must act inside a short window (kill a trainer while its checkpoint or export is
being written) used to poll the folder every 0.5-1 ms, taking CPU from the process it watched.
`wait_for_entry` blocks in select() until the kernel reports the name, so the watcher costs
nothing until then and reacts within microseconds.
"""
from __future__ import annotations

import ctypes
import os
import select
import struct
import time

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_libc = ctypes.CDLL(None, use_errno=True)


def _inotify(path: str) -> int:
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0 or _libc.inotify_add_watch(fd, os.fsencode(path), IN_CREATE | IN_MOVED_TO) < 0:
        raise OSError(ctypes.get_errno(), f"inotify on {path}")
    return fd


def _names(fd: int, timeout: float) -> list[str]:
    if not select.select([fd], [], [], max(timeout, 0.0))[0]:
        return []
    data, names, offset = os.read(fd, 65536), [], 0
    while offset < len(data):
        _, _, _, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        names.append(data[offset:offset + length].rstrip(b"\0").decode())
        offset += length
    return names


def wait_for_entry(folder, matches, timeout: float = 120, alive=lambda: True,
                   ignore=frozenset()) -> str | None:
    """The first name in `folder` for which `matches(name)` holds and that is not in `ignore`
    (say, what was there before the process started): one already there, or one created (or
    renamed into it) later. Waits for `folder` itself to exist first (checked every 50 ms).
    None when `alive()` turns false or `timeout` seconds pass."""
    folder, deadline = os.fspath(folder), time.monotonic() + timeout
    while not os.path.isdir(folder):
        if not alive() or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    fd = _inotify(folder)
    try:
        # Names created before the watch began are in the listing, later ones in the events.
        found = [n for n in os.listdir(folder) if n not in ignore and matches(n)]
        while not found:
            if not alive() or time.monotonic() > deadline:
                return None
            found = [n for n in _names(fd, min(0.2, deadline - time.monotonic()))
                     if n not in ignore and matches(n)]
        return found[0]
    finally:
        os.close(fd)
