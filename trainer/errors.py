"""The trainer's errors, exit codes and stop signals, in one module without TensorFlow (it is
imported before TensorFlow loads: by trainer.main first thing, and by trainer.sweep, which must
never load it).

Exit codes (docs/reliability.md "Exit codes and signals"), chosen from sysexits.h so that a
scheduler can tell a restart that will succeed from one that will not:

  0   finished (results.json written)
  1   everything else: a user error or a fault a restart does not cure (one line on stderr)
  2   a command-line usage error
  69  EX_UNAVAILABLE: a peer worker died, froze or became unreachable; restart every worker
  74  EX_IOERR: the disk is full, read-only, or a file hit its size limit (ENOSPC, EROFS,
      EFBIG); the previous checkpoint is intact: make room, then restart
  75  EX_TEMPFAIL: stopped by SIGTERM/SIGINT with what is complete kept (in the loop: a
      checkpoint saved at the stop); restart to go on
  130/143  128 + the signal: a second SIGINT/SIGTERM, which ends the process at once (no new
      checkpoint: the run goes on from the last one, as after a kill)
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE
EXIT_DISK = 74  # EX_IOERR
EXIT_PREEMPTED = 75  # EX_TEMPFAIL
# A holder whose run folder lock was taken over (state/run_lock.py): a restart would be
# refused while the new holder runs, so this is an ordinary failure, not a "restart me".
EXIT_LOCK_LOST = EXIT_FAILURE


class TrainingError(RuntimeError):
    """A run that cannot start or go on; str() is a one-line message for the user."""


class PeerLost(TrainingError):
    """Another worker died, froze or became unreachable (exit code EXIT_PEER_LOST)."""


class RunError(ValueError):
    """The run directory or checkpoint cannot be used; str() is a one-line message."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived in the loop or the finishing phase; a checkpoint was saved at
    `step` (exit code EXIT_PREEMPTED)."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


class Interrupted(BaseException):
    """SIGTERM/SIGINT outside the loop (set-up phases: S3 sync, data check, restore, ceiling
    measurement, trace): the phase is abandoned. A BaseException, as KeyboardInterrupt, so
    that no `except Exception` of a phase swallows it."""

    def __init__(self, sig: int):
        super().__init__(f"signal {sig}")
        self.signal = sig


# ---- signals ----------------------------------------------------------------------------------
# Set by trainer.sweep in its trials' environment (see Interrupts).
SWEEP_TRIAL_ENV = "TRAINER_SWEEP_TRIAL"


class Interrupts:
    """The process-wide SIGTERM/SIGINT handler (INTERRUPTS), installed by trainer.main before
    anything else. A first signal is recorded; outside a `deferred()` block it also raises
    Interrupted at once, so a set-up phase stops where it is. Inside (the training loop and the
    finishing phase, actions.StopSignal) the controller reads `received` at its next loop end
    and saves a checkpoint first. A second signal ends the process at once with 128 + signal
    (130 for SIGINT, 143 for SIGTERM), the shell's code for a process killed by that signal:
    no checkpoint is saved by that stop, so it must not read as EXIT_PREEMPTED.

    A trial of trainer.sweep (SWEEP_TRIAL_ENV set) never takes a second signal as a second
    stop: the sweep's PR_SET_PDEATHSIG fires once for each exiting thread of the killed sweep
    (the trainer is reparented thread by thread, its parent PID unchanged), so a killed
    sweep's trainer got two SIGTERMs and exited 143 without its checkpoint. The sweep owns
    its trials' stops (it forwards one SIGTERM, and SIGKILLs a trial on a second signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict | None = None
        self._deferred = 0
        self._force_second = True

    @property
    def installed(self) -> bool:
        return self._previous is not None

    def install(self, force_second: bool = True) -> None:
        self._force_second = force_second and not os.environ.get(SWEEP_TRIAL_ENV)
        if self._previous is None:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def reassert(self) -> None:
        """Registers the handler again where it is installed: building a multi-worker
        strategy installs TensorFlow's own SIGTERM handler (its preemption notifier, in C++),
        which swallows the signal; seen as a SIGTERM to one worker that stopped nobody."""
        if self._previous is not None:
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = None

    def deferred(self) -> "_Deferred":
        """A block in which a first signal is only recorded (read at the loop's end)."""
        return _Deferred(self)

    def _handle(self, sig: int, frame) -> None:
        if self.received and self._force_second:
            print(f"trainer: second signal {sig}: stopping at once (exit code {128 + sig}); "
                  f"the run goes on from its last checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + sig)
        if self.received:
            return
        self.received.append(sig)
        if not self._deferred:
            raise Interrupted(sig)
        # os.write, not print: a print here could re-enter the one the main thread is in. A
        # notebook's stdout has no file descriptor: then the line is left out.
        with contextlib.suppress(Exception):
            os.write(sys.stdout.fileno(), f"signal {sig} received: stopping at the end of this "
                     f"loop with a checkpoint (a second signal stops at once)\n".encode())


class _Deferred:
    def __init__(self, interrupts: Interrupts):
        self.interrupts = interrupts

    def __enter__(self):
        self.interrupts._deferred += 1
        return self.interrupts

    def __exit__(self, *exc) -> None:
        self.interrupts._deferred -= 1


INTERRUPTS = Interrupts()


# ---- classifying errors -----------------------------------------------------------------------
DISK_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
               errno.EFBIG: "File too large"}
_DISK_MESSAGES = tuple(DISK_ERRNOS.values())
# A path in a TensorFlow message: after "{{function_node ...}}" is removed, the first absolute
# path (TF names the file it was writing: "<path>; No space left on device").
_PATH = re.compile(r"(?<![\w:])(/[^\s;'\"]+)")


def _chain(error: BaseException):
    """`error` and the errors it was raised from or during, newest first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_error(error: BaseException) -> tuple[str, str] | None:
    """(reason, path) if `error`, or an error it was raised during (a failing write in a
    `finally` after the first), is a full or read-only disk or a file over its size limit:
    an OSError with ENOSPC/EROFS/EFBIG, or an error whose message carries the system's text
    for one (tf.errors.ResourceExhaustedError "...; No space left on device", a TrainingError
    made from one). The oldest such error that names a path names it; "" when none is known."""
    found = None
    for link in _chain(error):  # newest first: the last one with a path wins
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:
            here = (DISK_ERRNOS[link.errno], str(link.filename or ""))
        else:
            text = re.sub(r"\{\{.*?\}\}\s*", "", str(link))
            reason = next((m for m in _DISK_MESSAGES if m in text), None)
            if not reason:
                continue
            path = _PATH.search(text)
            here = (reason, path.group(1) if path else "")
        if found is None or here[1]:
            found = here
    return found


def disk_line(reason: str, path: str, kept: str) -> str:
    where = f" writing {path}" if path else ""
    what = {"No space left on device": "the disk is full",
            "Read-only file system": "the file system is read-only",
            "File too large": "a file reached its size limit"}[reason]
    return (f"{what} ({reason}){where}: stopped; {kept}; nothing half-written is under a final "
            f"name; make room (or make it writable) and run again with the same --model_dir "
            f"(exit code {EXIT_DISK})")


# TensorFlow's error classes (by name: no TensorFlow here) that a collective or the
# coordination service raises when a peer is gone, and message texts of a lost connection that
# come with other classes (UnknownError, InternalError from gRPC).
PEER_ERROR_CLASSES = ("UnavailableError", "DeadlineExceededError", "AbortedError",
                      "CancelledError")
PEER_MESSAGES = ("failed to connect", "socket closed", "connection reset", "connection refused",
                 "heartbeat", "coordination service", "collective ops is aborted",
                 "unavailable", "deadline exceeded", "is no longer alive", "lost connection")


def is_peer_lost(error: BaseException) -> bool:
    """True if `error` (a tf.errors.OpError of a run with several workers) says a peer is dead
    or unreachable; False for a real error of this worker (a full disk, a bad image, out of
    memory), which is then reported as itself."""
    if disk_error(error):
        return False
    if type(error).__name__ in PEER_ERROR_CLASSES:
        return True
    text = str(error).lower()
    return any(message in text for message in PEER_MESSAGES)
