"""Serve TensorBoard on 127.0.0.1: python -m trainer.tensorboard [LOGDIR] [--port=N]

LOGDIR defaults to runs/ (every run under it, compared side by side). The port defaults to a
free one; the URL is printed once the server answers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTUP_SECONDS = 180  # TensorBoard imports TensorFlow first: tens of seconds on a busy machine


def serving_logdir(url: str) -> str | None:
    """The log directory the TensorBoard at `url` serves, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url + "data/environment", timeout=2) as response:
            return json.load(response).get("data_location")
    except (OSError, ValueError):
        return None


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh tensorboard", description=__doc__.split("\n")[0])
    parser.add_argument("logdir", nargs="?", default="runs")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.logdir):
        print(f"tensorboard: log directory {args.logdir!r} does not exist (train a run first: "
              "./run.sh)", file=sys.stderr)
        return 1
    if args.port and not port_is_free(args.port):  # else another server's page would answer
        print(f"tensorboard: port {args.port} on 127.0.0.1 is taken (omit --port for a free one)",
              file=sys.stderr)
        return 1
    port = args.port or free_port()
    logdir = os.path.abspath(args.logdir)
    command = [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
               "--host=127.0.0.1", f"--port={port}"]
    # SIGTERM (a scheduler, a test) stops the server too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    log = tempfile.TemporaryFile("w+")  # the server's own messages, shown if it fails
    server = subprocess.Popen(command, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + STARTUP_SECONDS
        while serving_logdir(url) != logdir:  # our server, not another one on a taken port
            if server.poll() is not None:
                log.seek(0)
                last = [line for line in log.read().splitlines() if line.strip()][-1:]
                print(f"tensorboard: the server exited with code {server.returncode} "
                      f"(is port {port} taken?){': ' + last[0] if last else ''}",
                      file=sys.stderr)
                return 1
            if time.time() > deadline:
                print(f"tensorboard: no answer from {url} for {logdir} after {STARTUP_SECONDS} "
                      f"s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"TensorBoard for {logdir} at {url} (Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
