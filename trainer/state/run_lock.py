"""One writer per run folder: model_dir/.lock, held by the process that trains the run (the chief
with several workers) from before it writes anything until it exits.

The lock file is JSON: host, boot id, PID and the PID's start time, the start time, the
command, a random token. It is created whole or not at all (written under a temporary name,
then hard-linked to `.lock`, which fails if the name exists: safe on NFS too). While held, a
thread touches it every HEARTBEAT_SECONDS (its mtime is the heartbeat). Another start:

  - holder on this host (same host name and boot id) and alive: refused in one line naming it;
  - holder on this host and gone (no such PID, or the PID now belongs to another process, or
    the machine rebooted since): the lock is stale, taken over with one line;
  - holder on another host: alive while its heartbeat is younger than LEASE_SECONDS (a
    shared file system); older: taken over with one line.

A takeover renames the stale file aside first (only one taker can), and checks that what it
moved is what it judged stale. A holder whose heartbeat finds its lock gone or someone else's
(it was suspended past the lease and taken over) stops at once (exit 1) rather than write on
beside the new holder. Read-only tools (evaluate, predict, export to another folder,
tensorboard) take no lock.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import threading
import time
import uuid

from data.files import file_mode, fsync_path
from trainer.errors import EXIT_LOCK_LOST, RunError

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 300.0


class LockHeld(RunError):
    """Another process holds the run folder; str() is one line naming it."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str | None:
    """The PID's start time in clock ticks since boot (/proc), None if no such process; "" if
    this system has no /proc (then only existence is checked)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def record() -> dict:
    """What this process writes into the lock."""
    return {"host": platform.node(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()) or "",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "command": [os.path.basename(sys.executable)] + sys.argv, "token": uuid.uuid4().hex}


def describe(holder: dict) -> str:
    command = " ".join(holder.get("command") or [])
    command = command if len(command) <= 120 else command[:117] + "..."
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started')} ({command})")


def staleness(holder: dict, heartbeat_age: float) -> str | None:
    """Why the lock of `holder` is stale (one phrase), or None while its holder may live."""
    same_host = holder.get("host") == platform.node()
    if same_host and holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return "this host rebooted since it was taken"
    if same_host:
        start = _pid_start(int(holder.get("pid", -1)))
        if start is None:
            return f"pid {holder.get('pid')} is no longer running on this host"
        if start and holder.get("pid_start") and start != holder["pid_start"]:
            return f"pid {holder.get('pid')} is now another process"
        return None
    if heartbeat_age > LEASE_SECONDS:
        return f"its heartbeat stopped {heartbeat_age:.0f} s ago (lease {LEASE_SECONDS:.0f} s)"
    return None


def read(path: str) -> tuple[dict | None, float]:
    """(the lock's record, its heartbeat age in seconds); (None, 0) if there is none. A lock
    that does not parse counts as a record of nobody (stale once its lease is over)."""
    try:
        with open(path) as f:
            text = f.read()
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None, 0.0
    try:
        holder = json.loads(text)
        return (holder if isinstance(holder, dict) else {}), age
    except ValueError:
        return {}, age


def check_free(model_dir: str) -> None:
    """LockHeld if a live holder has the lock (read only: a start answered before TensorFlow
    loads; the lock itself is taken later, by the chief)."""
    path = os.path.join(model_dir, LOCK_FILE)
    holder, age = read(path)
    if holder is not None and staleness(holder, age) is None:
        raise LockHeld(_held_line(path, holder, age))


def _held_line(path: str, holder: dict, age: float) -> str:
    return (f"--model_dir={os.path.dirname(path)} is in use by {describe(holder)}; one process "
            f"writes a run at a time (lock {path}, heartbeat {age:.0f} s ago; a holder on "
            f"another host that stops beating is taken over after {LEASE_SECONDS:.0f} s)")


class RunLock:
    """The lock of one run folder, held from `acquire` to `release` (a context manager)."""

    def __init__(self, model_dir: str, log=print):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self.log = log
        self.record = record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (one line); LockHeld if it is held."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="run-lock-heartbeat")
                self._thread.start()
                return
            holder, age = read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            why = staleness(holder, age)
            if why is None:
                raise LockHeld(_held_line(self.path, holder, age))
            if self._take_over(holder, why):
                continue
        raise LockHeld(f"--model_dir={os.path.dirname(self.path)}: could not take the lock "
                       f"{self.path} (others are starting on it too); try again")

    def _create(self) -> bool:
        """Create the lock whole (temporary file hard-linked to its name); False if it exists."""
        tmp = f"{self.path}.{self.record['token']}"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
            fsync_path(os.path.dirname(self.path))

    def _take_over(self, holder: dict, why: str) -> bool:
        """Move the stale lock aside; True if what moved was the lock judged stale."""
        aside = f"{self.path}.stale-{self.record['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved, _ = read(aside)
        if (moved or {}).get("token") != holder.get("token"):  # a new holder came meanwhile
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        self.record["took_over_from"] = holder
        self.log(f"took over the stale lock of {os.path.dirname(self.path)}: it was held by "
                 f"{describe(holder)}, and {why}")
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.beat()

    def beat(self) -> None:
        """Touch the lock; if it is no longer ours, stop this process at once."""
        holder, _ = read(self.path)
        if holder is None or holder.get("token") != self.record["token"]:
            now = describe(holder) if holder else "nobody (the lock file is gone)"
            print(f"trainer: lost the lock of {os.path.dirname(self.path)}: it is now held by "
                  f"{now}; stopping at once so that one process writes the run (its "
                  f"checkpoints are as at the last save)", file=sys.stderr, flush=True)
            os._exit(EXIT_LOCK_LOST)
        os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, _ = read(self.path)
        if holder is not None and holder.get("token") == self.record["token"]:
            os.remove(self.path)
