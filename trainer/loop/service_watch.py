"""--data_service: bound the waits on the tf.data service.

The service's client retries inside TensorFlow: a dead worker or dispatcher leaves the compiled
training loop blocked in `next(iterator)` (for up to an hour), where neither Python's signal
handlers nor any timeout run, and an unreachable dispatcher blocks the dataset's registration
the same way. Here:

- before the input is built, the dispatcher's port is probed (a plain TCP connect) until it
  answers or --data_service_timeout passes;
- each training loop runs under a CancellationManager, and a watcher thread cancels it when the
  step counter has not moved for --data_service_timeout seconds, or when SIGTERM/SIGINT came
  (seen through `signal.set_wakeup_fd`, which the C-level handler writes even while the main
  thread is blocked) and no step has completed for SIGNAL_GRACE seconds (twice the slowest step
  seen, if longer): a loop that still makes progress is left to finish, as without the service.

Cancelling only a loop that has stalled in `next(iterator)` leaves the model, the optimizer and
the step counter as after the last completed step (nothing of the next step has run): the
controller saves exactly that (data position = step + skipped batches, as always) and stops
with exit code 75.
"""
from __future__ import annotations

import select
import signal
import socket
import threading
import time

import tensorflow as tf
from tensorflow.python.eager import cancellation

from data import service

SIGNAL_GRACE = 5.0  # seconds without a completed step after a signal before the loop is cancelled
POLL = 0.25


# The service's training iterators, kept until the process ends: destroying one whose worker or
# dispatcher died blocks while its client retries them (up to an hour); main.py ends a service
# run with os._exit, after its files are closed and the run folder's lock released.
KEPT_ITERATORS: list = []


class InputLost(Exception):
    """The training input from the tf.data service stopped (or a signal came while waiting for
    it); str() is one line, without the step (the controller adds it)."""


class ServiceWatch:
    def __init__(self, address: str, timeout: float, read_step):
        self.address, self.timeout, self.read_step = address, timeout, read_step
        self._signals = None  # the read end of the wakeup socket while one is installed

    def describe(self) -> str:
        """The start-up line."""
        return (f"data service {self.address}: a batch is awaited at most "
                f"--data_service_timeout={self.timeout:g} s, then the run saves its step and "
                f"stops (exit 75); a resume keeps the step and the position in the epoch, not "
                f"the exact batches (docs/reliability.md)")

    def wait_for_dispatcher(self) -> None:
        """Returns once the dispatcher's port answers; InputLost after `timeout` seconds or at a
        signal."""
        start = time.monotonic()
        with self._signal_socket():
            while True:
                why = service.dispatcher_unreachable(self.address, timeout=min(2.0, self.timeout))
                waited = time.monotonic() - start
                if why is None:
                    return
                if waited >= self.timeout:
                    raise InputLost(f"the tf.data service dispatcher {self.address} did not "
                                    f"answer for {waited:.0f} s ({why}; --data_service_timeout="
                                    f"{self.timeout:g})")
                sig = self._signal_within(min(0.5, self.timeout - waited))
                if sig:
                    raise InputLost(f"stopped by signal {sig} while waiting for the tf.data "
                                    f"service dispatcher {self.address} ({why})")

    def run(self, loop, *args):
        """loop(*args), cancelled (InputLost) when the service's input stalls; see the module
        doc."""
        manager = cancellation.CancellationManager()
        done, outcome = threading.Event(), {}
        with self._signal_socket():
            watcher = threading.Thread(target=self._watch, args=(manager, done, outcome),
                                       name="data-service-watch", daemon=True)
            watcher.start()
            try:
                with cancellation.CancellationManagerContext(manager):
                    return loop(*args)
            except tf.errors.CancelledError:
                if "why" in outcome:
                    raise InputLost(outcome["why"]) from None
                raise
            finally:
                done.set()
                watcher.join()

    def _watch(self, manager, done: threading.Event, outcome: dict) -> None:
        """The watcher thread: sets outcome["why"] and cancels the loop, or returns at `done`."""
        last_step, last_progress, slowest, signal_at = self.read_step(), time.monotonic(), 0.0, 0
        completed = 0
        while not done.is_set():
            sig = self._signal_within(POLL)
            signal_at = signal_at or sig
            step, now = self.read_step(), time.monotonic()
            if step != last_step:
                if completed:  # the first step's time holds the function's start-up
                    slowest = max(slowest, (now - last_progress) / (step - last_step))
                completed += step - last_step
                last_step, last_progress = step, now
                continue
            idle = now - last_progress
            if idle >= self.timeout:
                outcome["why"] = (f"no training batch from the tf.data service {self.address} "
                                  f"for {idle:.0f} s (a worker or the dispatcher stopped or is "
                                  f"unreachable; --data_service_timeout={self.timeout:g})")
            elif signal_at and idle >= max(SIGNAL_GRACE, 2 * slowest):
                outcome["why"] = (f"stopped by signal {signal_at} while waiting {idle:.0f} s "
                                  f"for a batch from the tf.data service {self.address}")
            if "why" in outcome and not done.is_set():
                manager.start_cancel()
                return

    def _signal_socket(self):
        return _WakeupSocket(self)

    def _signal_within(self, seconds: float) -> int:
        """The number of a signal that arrived within `seconds` (0: none)."""
        if self._signals is None:
            time.sleep(max(seconds, 0.0))
            return 0
        ready, _, _ = select.select([self._signals], [], [], max(seconds, 0.0))
        if not ready:
            return 0
        data = self._signals.recv(64)
        return data[-1] if data else 0


class _WakeupSocket:
    """signal.set_wakeup_fd on a socket pair for the duration of a `with` (main thread only):
    the interpreter's C signal handler writes each signal's number there at once."""

    def __init__(self, watch: ServiceWatch):
        self.watch = watch

    def __enter__(self):
        self.read, self.write = socket.socketpair()
        for end in (self.read, self.write):
            end.setblocking(False)
        self.previous = signal.set_wakeup_fd(self.write.fileno(), warn_on_full_buffer=False)
        self.watch._signals = self.read
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous)
        self.watch._signals = None
        self.read.close()
        self.write.close()
