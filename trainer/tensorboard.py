"""Serve TensorBoard on 127.0.0.1: python -m trainer.tensorboard [LOGDIR] [--port=N]

LOGDIR defaults to runs/ (every run under it, compared side by side). The port defaults to a
free one; the URL is printed once the server answers.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run.sh tensorboard", description=__doc__.split("\n")[0])
    parser.add_argument("logdir", nargs="?", default="runs")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.logdir):
        print(f"tensorboard: log directory {args.logdir!r} does not exist (train a run first: "
              "./run.sh)", file=sys.stderr)
        return 1
    port = args.port or free_port()
    command = [sys.executable, "-m", "tensorboard.main", f"--logdir={args.logdir}",
               "--host=127.0.0.1", f"--port={port}"]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            if server.poll() is not None:
                print(f"tensorboard: the server exited with code {server.returncode} "
                      f"(is port {port} taken?)", file=sys.stderr)
                return 1
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        print(f"TensorBoard for {os.path.abspath(args.logdir)} at {url} (Ctrl-C stops it)",
              flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
