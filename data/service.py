"""tf.data service: decoding and augmentation on other processes or hosts.

    python -m data.service dispatcher --port=5050 [--work_dir=DIR]
    python -m data.service worker --dispatcher=HOST:5050 --port=5051 [--worker_host=HOST]
    python -m trainer.main ... --data_service=grpc://HOST:5050

The trainer builds its training dataset as usual (same order, same augmentation) and, with
`--data_service`, hands the whole graph to the dispatcher (`distribute`); workers run it and
stream the finished per-replica batches back. Workers read the data themselves: the same
--data_dir (and disk cache) path must exist on every worker host.

Sharding is DYNAMIC over the dataset's first source, the range of epochs: each worker produces
whole epochs, in the very order and with the very augmentation of a local run. With one worker
the batches arrive in the local order: exact resume holds (bit-identical with --deterministic;
tested). With W > 1 workers each batch is still one the local run would train on, but batches of
up to W epochs arrive interleaved in arrival order, so a resumed run sees the same set of
batches in another order, and MixUp/CutMix pairs are seeded by each worker's own batch count.
Evaluation does not go through the service: it runs in the trainer, so every image is
evaluated exactly once whatever the worker count.

Faults: the service's client retries a lost worker or dispatcher inside TensorFlow for up to
an hour; the trainer bounds those waits (trainer/loop/service_watch.py, --data_service_timeout)
with `dispatcher_unreachable` before it registers the dataset.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

PROTOCOL = "grpc"


def distribute(dataset, address: str):
    """`dataset` (built by the trainer) run by the tf.data service at grpc://HOST:PORT."""
    import tensorflow as tf
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=address))


def parse_address(value: str) -> str:
    """"grpc://HOST:PORT" -> "HOST:PORT"; ValueError for anything else."""
    prefix = f"{PROTOCOL}://"
    host, _, port = value[len(prefix):].rpartition(":") if value.startswith(prefix) else ("", "",
                                                                                         "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not {PROTOCOL}://HOST:PORT")
    return f"{host}:{port}"


def dispatcher_unreachable(address: str, timeout: float = 2.0) -> str | None:
    """None when HOST:PORT of `address` (grpc://HOST:PORT) accepts a TCP connection within
    `timeout` seconds, else why not (one phrase). A plain connect, because the service's own
    client retries for an hour inside TensorFlow, where no signal or timeout reaches it."""
    host, _, port = parse_address(address).rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def _serve(server, what: str) -> int:
    """Serve until SIGTERM or Ctrl-C (the server runs in its own threads; `join()` would block
    signals in C++, so the main thread sleeps in Python instead)."""
    print(f"data.service: {what}", flush=True)
    # os._exit: an orderly interpreter exit can wait on the servers' threads.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    while True:
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.service",
                                     description="Run a tf.data service dispatcher or worker.")
    sub = parser.add_subparsers(dest="role", required=True)
    dispatcher = sub.add_parser("dispatcher", help="the coordinator the trainers connect to")
    dispatcher.add_argument("--port", type=int, required=True)
    dispatcher.add_argument("--work_dir", default="", help="journal for a restartable "
                            "dispatcher (fault-tolerant mode); empty: in memory")
    worker = sub.add_parser("worker", help="a process that runs the input pipelines")
    worker.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--worker_host", default="localhost", help="the name the dispatcher "
                        "and trainers reach this worker by")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port={args.port}: not a TCP port")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    service = tf.data.experimental.service
    if args.role == "dispatcher":
        server = service.DispatchServer(service.DispatcherConfig(
            port=args.port, protocol=PROTOCOL, work_dir=args.work_dir or None,
            fault_tolerant_mode=bool(args.work_dir)))
        return _serve(server, f"dispatcher on port {args.port} ({PROTOCOL}://HOST:{args.port})")
    server = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=args.dispatcher, port=args.port, protocol=PROTOCOL,
        worker_address=f"{args.worker_host}:{args.port}"))
    return _serve(server, f"worker on port {args.port}, dispatcher {args.dispatcher}")


if __name__ == "__main__":
    sys.exit(main())
