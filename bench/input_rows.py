"""Input benchmark rows: how fast each data path delivers training batches, and its memory.

    python -m bench.input_rows [--image_size=160] [--batch_size=32] [--steps=40] [--rows=...]
    ./run.sh bench --rows=in_folder,in_packed,in_disk,in_service1,in_service2,s3_sync

Rows (each its own process; no model, decoded + augmented + batched images/sec after
`--warmup_steps` batches, and the process's peak resident memory; warm-up: from opening the data,
after TensorFlow is imported, to the end of the warm-up batches):

  in_folder    JPEG folder, --cache_images=none (decode at every use)
  in_packed    packed TFRecord shards (data.pack), --cache_images=none
  in_disk      packed data, --cache_images=disk (cache built before timing; build time reported)
  in_service1  packed data through a tf.data service with 1 worker on this host
  in_service2  the same with 2 workers
  s3_sync      seconds to sync the photo set from the SeaweedFS test server as image files and
               as a packed folder (objects, MB)

The photo set is data/photos.py (real JPEG photographs, 8 classes) unless --data_dir is given.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROWS = ("in_folder", "in_packed", "in_disk", "in_service1", "in_service2", "s3_sync")
LABELS = {"in_folder": "folder (JPEG files), no cache", "in_packed": "packed shards, no cache",
          "in_disk": "packed, --cache_images=disk",
          "in_service1": "packed, tf.data service, 1 worker",
          "in_service2": "packed, tf.data service, 2 workers"}


def _peak_rss_mb(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def worker(row: str, args) -> dict:
    """In a fresh process: time `args.steps` batches of the row's training dataset."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    importlib.import_module("tensorflow")  # loaded before the clock starts
    from data import service, source
    from data.spec import InputSpec
    data_dir = args.data_dir if row == "in_folder" else args.packed_dir
    start = time.perf_counter()
    src = source.open_source(data_dir)
    split = src.manifest.splits["train"] if src.kind == "packed" else _folder_split(data_dir)
    spec = InputSpec(args.image_size, args.batch_size,
                     cache="disk" if row == "in_disk" else "none", cache_dir=args.cache_dir)
    dataset = src.train_dataset(split, spec, total_steps=args.warmup_steps + args.steps)
    if args.service:
        dataset = service.distribute(dataset, args.service)
    return dict(time_batches(dataset, args.warmup_steps, start), peak_rss_mb=_peak_rss_mb())


def time_batches(dataset, warmup_batches: int, start: float) -> dict:
    """Steady images/sec over `dataset`'s batches after the first `warmup_batches`, and the
    seconds from `start` to the end of the warm-up."""
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    warmup = time.perf_counter() - start
    start, count = time.perf_counter(), 0
    for images, _, _ in iterator:
        count += int(images.shape[0])
    return {"images_per_second": count / (time.perf_counter() - start),
            "warmup_seconds": warmup}


def _folder_split(data_dir: str):
    from data import check
    return check.scan(data_dir, cache_path=check.default_cache_path(data_dir)).splits["train"]


def _run(row: str, args, service: str = "") -> dict:
    command = [sys.executable, "-m", "bench.input_rows", f"--worker={row}",
               f"--data_dir={args.data_dir}", f"--packed_dir={args.packed_dir}",
               f"--cache_dir={args.cache_dir}", f"--image_size={args.image_size}",
               f"--batch_size={args.batch_size}", f"--steps={args.steps}",
               f"--warmup_steps={args.warmup_steps}", f"--service={service}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"input row {row} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _with_service(row: str, args, workers: int) -> dict:
    from tests.s3_server import free_ports, stop_process_group
    ports = free_ports(workers + 1)
    command = [sys.executable, "-m", "data.service"]
    processes = []
    try:
        for role in [["dispatcher", f"--port={ports[0]}"]] + [
                ["worker", f"--dispatcher=127.0.0.1:{ports[0]}", f"--port={port}",
                 "--worker_host=127.0.0.1"] for port in ports[1:]]:
            processes.append(subprocess.Popen(command + role, stdout=subprocess.PIPE,
                                              text=True, start_new_session=True))
            processes[-1].stdout.readline()  # the server is up
        measured = _run(row, args, f"grpc://127.0.0.1:{ports[0]}")
        measured["worker_peak_rss_mb"] = [_peak_rss_mb(p.pid) for p in processes[1:]]
        return measured
    finally:
        for process in processes:
            stop_process_group(process)


def _s3_sync_row(args, work: str) -> dict:
    from data import s3
    from tests.s3_server import running_server
    out = {}
    with running_server(os.path.join(work, "s3")) as server:
        server.make_bucket("bench")
        for name, folder in (("files", args.data_dir), ("packed", args.packed_dir)):
            keys = server.upload_tree(folder, "bench", name)
            size = sum(os.path.getsize(os.path.join(folder, k[len(name) + 1:])) for k in keys)
            start = time.perf_counter()
            s3.sync(f"s3://bench/{name}", os.path.join(work, "synced", name),
                    endpoint_url=server.endpoint_url, key=server.key, secret=server.secret,
                    progress=False)
            out[name] = {"objects": len(keys), "mb": size / 1e6,
                         "seconds": time.perf_counter() - start}
    return out


def measure_row(row: str, args, work: str) -> dict:
    """One row, measured from bench.run (args: its flags; work: its temporary folder)."""
    args.packed_dir = getattr(args, "packed_dir", "") or os.path.join(work, "packed")
    args.cache_dir = os.path.join(work, "cache")
    if not os.path.exists(os.path.join(args.packed_dir, "manifest.json")):
        subprocess.run([sys.executable, "-m", "data.pack", f"--data_dir={args.data_dir}",
                        f"--dest={args.packed_dir}", "--shard_mb=4"], check=True,
                       capture_output=True)
    if row == "s3_sync":
        return _s3_sync_row(args, work)
    if row.startswith("in_service"):
        return _with_service(row, args, int(row[-1]))
    return _run(row, args)


def table(rows: dict) -> str:
    lines = ["| input row | images/sec | peak memory MB | warm-up s |", "|---|---:|---:|---:|"]
    for key, label in LABELS.items():
        if key in rows:
            r = rows[key]
            memory = f"{r['peak_rss_mb']:.0f}"
            if "worker_peak_rss_mb" in r:
                memory += " + workers " + " + ".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"])
            lines.append(f"| {label} | {r['images_per_second']:.0f} | {memory} | "
                         f"{r['warmup_seconds']:.1f} |")
    if "s3_sync" in rows:
        for name, r in rows["s3_sync"].items():
            lines.append(f"| S3 sync of the photo set as {name}: {r['objects']} objects, "
                         f"{r['mb']:.1f} MB | {r['seconds']:.2f} s | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import OneLineErrorParser
    parser = OneLineErrorParser(prog="python -m bench.input_rows",
                                description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--packed_dir", default="")
    parser.add_argument("--cache_dir", default="")
    parser.add_argument("--image_size", type=int, default=160)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--images_per_class", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--service", default="")
    parser.add_argument("--worker", default="")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    unknown = sorted(set(r for r in args.rows.split(",") if r) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        if not args.data_dir:
            from data import photos
            args.data_dir = os.path.join(work, "photos")
            photos.build(args.data_dir, image_size=max(args.image_size, 96), num_classes=8,
                         per_class=args.images_per_class)
        for row in [r for r in args.rows.split(",") if r]:
            print(f"bench: running {row} ...", file=sys.stderr, flush=True)
            rows[row] = measure_row(row, args, work)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
