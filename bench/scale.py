"""The scale benchmark: the reference job's data size through every input path and cache mode.

    python -m bench.scale [--data_dir=/work/scale/birds] [--scale=1] [--rows=ROW,...]
                          [--max_rss_gb=20] [--out=FILE.md]

builds (or reuses) a bird-layout folder the size of the Kaggle birds set, DIR/train|valid|test/
<CLASS NAME>/*.jpg: 525 classes x (160 train + 5 valid + 5 test) JPEGs at 224x224, i.e. 84,000 /
2,625 / 2,625, generated offline from scikit-learn's two sample photos (data/photos.py
`ensure_birds`: per-class regions, orientations and colours; the marker `.complete`, written
last, says what the folder holds, and a folder whose marker matches is reused). `--scale=F`
keeps the 525 classes and multiplies the images per class by F (at least one per split: 0.1
gives 16 train + 1 valid + 1 test per class, 9,450 images); `--classes=N` takes the first N
classes (for tests). Then it measures, each row in its own process, and prints one Markdown table:

  check             python -m data.check: cold (--no_cache, every file decoded) and from the
                    folder's check cache; seconds, dataset MB
  pack              python -m data.pack into a new folder; seconds, packed MB (the result is kept
                    as --packed_dir when that has none)
  SRC_MODE          SRC folder or packed, MODE memory, disk, none or auto (--cache_images):
                    * the trainer, `python -m trainer.main --flagfile=configs/birds_resnet50.cfg`
                      (ResNet50, --mixed_precision=auto) for --train_steps steps of --batch_size
                      in loops of --steps_per_loop: seconds from its start to its first console
                      "step" line (the end of the first loop: set-up, data check from its
                      cache, disk-cache build, tracing, the first steps), steady training
                      images/sec (the mean of the later loops' img/s), peak RSS (VmHWM, and the
                      child's ru_maxrss from wait4). The bench stops it after its last loop (the
                      final evaluation and export are not part of the row);
                    * the input pipeline alone (the same source and cache mode, no model):
                      steady decoded + augmented + batched images/sec over --input_steps
                      batches (a disk cache the trainer built is reused, so not timed again).
                    A cache the trainer refuses (memory over --cache_memory_fraction of the
                    available memory) makes the row "not available"; the auto rows say which
                    cache the trainer chose.
  sync_folder       python -m data.download of the folder (every JPEG one object) and of the
  sync_packed       packed shards from a local SeaweedFS server (tests/s3_server.py) they were
                    uploaded to first; seconds, MB, objects

Every child runs under a watchdog that polls /proc/PID/status and /proc/meminfo every 0.2 s and
kills it (its whole process group) when its resident memory exceeds --max_rss_gb or the
machine's available memory falls below --min_available_gb; a killed child (by the watchdog or
the kernel's OOM killer) is reported as such with its peak RSS, and the next row runs.
`--rows` picks a subset (in the table's order). Scratch (model dirs, disk caches, the S3
server's data, synced copies) lives in a new folder under --work_dir, removed at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench import OneLineErrorParser, input_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = "/work/scale"
SOURCES = ("folder", "packed")
MODES = ("memory", "disk", "none", "auto")
TRAIN_ROWS = tuple(f"{s}_{m}" for s in SOURCES for m in MODES)
ROWS = ("check", "pack") + TRAIN_ROWS + ("sync_folder", "sync_packed")
STEP_LINE = re.compile(r"^epoch \d+ step (\d+)/(\d+) .* ([0-9.]+) img/s")
GB = 2 ** 30


# ============================================================================================
# Children under a memory watchdog
# ============================================================================================
def _status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "VmHWM")}
    except (OSError, ValueError):
        return {}


def _available_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))


class Child:
    """One command, its output lines with their times, its peak RSS and how it ended."""

    def __init__(self, command: list[str], *, max_rss_gb: float, min_available_gb: float,
                 timeout: float, log_path: str, env: dict | None = None, stop_when=None):
        self.command, self.lines, self.peak_kb, self.killed_by_bench = command, [], 0, ""
        self.stopped = False  # stopped by the bench once `stop_when(lines)` held
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, errors="replace", start_new_session=True)
        done = threading.Event()

        def kill(reason: str) -> None:
            if not self.killed_by_bench and not self.stopped:
                self.killed_by_bench = reason
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

        def watch() -> None:  # runs until the child is reaped (done is set before wait4)
            while not done.wait(0.2):
                status = _status_kb(process.pid)
                self.peak_kb = max(self.peak_kb, status.get("VmHWM", 0))
                rss, available = status.get("VmRSS", 0), _available_kb()
                if rss > max_rss_gb * GB / 1024:
                    kill(f"RSS {rss * 1024 / GB:.1f} GB > --max_rss_gb={max_rss_gb:g}")
                elif available < min_available_gb * GB / 1024:
                    kill(f"the machine's available memory {available * 1024 / GB:.1f} GB < "
                         f"--min_available_gb={min_available_gb:g}")
                elif time.monotonic() - start > timeout:
                    kill(f"still running after --row_timeout={timeout:g} s")

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            for line in process.stdout:
                self.lines.append((time.monotonic() - start, line.rstrip("\n")))
                log.write(line)
                if stop_when and not self.stopped and stop_when(self.lines):
                    self.stopped = True
                    kill("")
        process.stdout.close()
        done.set()
        watcher.join()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = self.returncode = os.waitstatus_to_exitcode(status)
        self.seconds = time.monotonic() - start
        self.peak_kb = max(self.peak_kb, usage.ru_maxrss)

    @property
    def peak_gb(self) -> float:
        return self.peak_kb * 1024 / GB

    @property
    def ok(self) -> bool:
        return self.returncode == 0 or self.stopped

    def failure(self) -> str:
        """Why it did not finish, in a few words ('' when it did)."""
        if self.ok:
            return ""
        if self.killed_by_bench:
            return f"killed by the bench ({self.killed_by_bench}), peak RSS {self.peak_gb:.1f} GB"
        if self.returncode < 0:
            return f"killed (exit {self.returncode}), peak RSS {self.peak_gb:.1f} GB"
        return f"failed (exit {self.returncode}): {self.last_line()}"

    def last_line(self) -> str:
        text = [line for _, line in self.lines if line.strip()]
        return text[-1].strip()[:200] if text else "no output"


# ============================================================================================
# The input pipeline alone (a worker process)
# ============================================================================================
def worker_input(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow  # noqa: F401 - loaded before the clock starts
    from data import check, source
    from data.spec import InputSpec
    start = time.perf_counter()
    src = source.open_source(args.data_dir)
    if src.kind == "packed":
        split = src.manifest.splits["train"]
    else:
        split = check.scan(args.data_dir, cache_path=check.default_cache_path(
            args.data_dir)).splits["train"]
    try:
        spec = InputSpec(args.image_size, args.batch_size, cache=args.cache,
                         cache_dir=args.cache_dir)
        dataset = src.train_dataset(split, spec,
                                    total_steps=args.input_warmup + args.input_steps)
    except ValueError as error:  # a cache mode the data layer does not have
        return {"not_available": str(error)}
    return input_rows.time_batches(dataset, args.input_warmup, start)


# ============================================================================================
# Rows
# ============================================================================================
def _tree_bytes(path: str, skip_hidden: bool = False) -> tuple[int, int]:
    """(files, bytes) under `path` (apparent sizes)."""
    files = size = 0
    for root, dirs, names in os.walk(path):
        if skip_hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            names = [n for n in names if not n.startswith(".")]
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return files, size


def _du(path: str) -> str:
    result = subprocess.run(["du", "-sh", path], capture_output=True, text=True)
    return result.stdout.split()[0] if result.returncode == 0 else "?"


class Bench:
    def __init__(self, args, work: str):
        self.args, self.work = args, work
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []

    def child(self, name: str, command: list[str], **kwargs) -> Child:
        print(f"scale: {name}: {' '.join(command[2:] if command[0] == sys.executable else command)}",
              file=sys.stderr, flush=True)
        return Child(command, max_rss_gb=self.args.max_rss_gb,
                     min_available_gb=self.args.min_available_gb,
                     timeout=self.args.row_timeout,
                     log_path=os.path.join(self.work, f"{name}.log"), **kwargs)

    # --- the data check ------------------------------------------------------------------
    def ensure_check_cache(self) -> None:
        """The trainer rows start on the folder's check cache, as every start after the first."""
        from data import check
        if not os.path.exists(os.path.join(self.args.data_dir, check.CACHE_NAME)):
            self.child("check-cache", [sys.executable, "-m", "data.check",
                                       f"--data_dir={self.args.data_dir}"])

    def row_check(self) -> dict:
        data_dir = self.args.data_dir
        cold = self.child("check-cold", [sys.executable, "-m", "data.check",
                                         f"--data_dir={data_dir}", "--no_cache"])
        if not cold.ok:
            return {"error": cold.failure(), "peak_gb": cold.peak_gb}
        self.ensure_check_cache()
        warm = self.child("check-cached", [sys.executable, "-m", "data.check",
                                           f"--data_dir={data_dir}"])
        files, size = _tree_bytes(data_dir, skip_hidden=True)
        return {"seconds": cold.seconds, "mb": size / 1e6, "peak_gb": cold.peak_gb,
                "note": f"cold (--no_cache: {files} files decoded); from its cache "
                        f"{warm.seconds:.0f} s" + ("" if warm.ok else f" ({warm.failure()})")}

    # --- packing -------------------------------------------------------------------------
    def row_pack(self) -> dict:
        self.ensure_check_cache()
        dest = os.path.join(self.work, "packed")
        run = self.child("pack", [sys.executable, "-m", "data.pack",
                                  f"--data_dir={self.args.data_dir}", f"--dest={dest}"])
        if not run.ok:
            return {"error": run.failure(), "peak_gb": run.peak_gb}
        files, size = _tree_bytes(dest, skip_hidden=True)
        shards = sum(name.endswith(".tfrecord") for name in os.listdir(dest))
        note = f"{shards} shards (--shard_mb=100); the check from its cache"
        if not os.path.exists(os.path.join(self.args.packed_dir, "manifest.json")):
            if os.path.exists(self.args.packed_dir):
                shutil.rmtree(self.args.packed_dir)
            os.makedirs(os.path.dirname(os.path.abspath(self.args.packed_dir)), exist_ok=True)
            shutil.move(dest, self.args.packed_dir)
            note += f"; kept as {self.args.packed_dir}"
        return {"seconds": run.seconds, "mb": size / 1e6, "peak_gb": run.peak_gb, "note": note}

    def ensure_packed(self) -> None:
        if not os.path.exists(os.path.join(self.args.packed_dir, "manifest.json")):
            self.ensure_check_cache()
            run = self.child("pack-prepare", [sys.executable, "-m", "data.pack",
                                              f"--data_dir={self.args.data_dir}",
                                              f"--dest={self.args.packed_dir}"])
            if not run.ok:
                raise RuntimeError(f"packing {self.args.data_dir} failed: {run.failure()}")

    # --- the trainer and the input pipeline, per source and cache mode -----------------------
    def row_train(self, row: str) -> dict:
        args = self.args
        source, mode = row.split("_")
        data_dir = args.data_dir if source == "folder" else args.packed_dir
        self.ensure_check_cache()
        if source == "packed":
            self.ensure_packed()
        row_work = os.path.join(self.work, row)
        cache_dir = os.path.join(row_work, "cache")
        os.makedirs(cache_dir)
        try:
            out = self._trainer(row, data_dir, mode, row_work, cache_dir)
            if "not_available" not in out:
                out.update(self._input(row, data_dir, mode, cache_dir))
            if mode == "disk" and os.path.isdir(cache_dir):
                out["cache_mb"] = _tree_bytes(cache_dir)[1] / 1e6
            return out
        finally:
            shutil.rmtree(row_work, ignore_errors=True)  # a disk cache is N x S x S x 3 bytes

    def _trainer(self, row: str, data_dir: str, mode: str, row_work: str,
                 cache_dir: str) -> dict:
        args = self.args
        loops = -(-args.train_steps // args.steps_per_loop)
        flags = ["--flagfile=configs/birds_resnet50.cfg", f"--data_dir={data_dir}",
                 f"--model_dir={os.path.join(row_work, 'run')}", f"--model={args.model}",
                 f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
                 f"--train_steps={args.train_steps}", f"--steps_per_loop={args.steps_per_loop}",
                 f"--cache_images={mode}", f"--data_cache_dir={cache_dir}",
                 "--checkpoint_every_steps=1000000", "--eval_every_steps=1000000",
                 "--noexport_at_end", "--high_loss_scan=0", "--noeval_figures",
                 f"--cache_memory_fraction={args.cache_memory_fraction}"]
        steps = lambda lines: [m for _, line in lines if (m := STEP_LINE.match(line))]
        run = self.child(f"{row}-trainer", [sys.executable, "-m", "trainer.main", *flags],
                         stop_when=lambda lines: len(steps(lines)) >= loops)
        out = {"peak_gb": run.peak_gb}
        chosen = [line.split(" (")[0] for _, line in run.lines if line.startswith("cache: ")]
        if chosen and mode == "auto":
            out["note"] = f"auto chose {chosen[0].removeprefix('cache: ')}"
        timed = [(t, STEP_LINE.match(line)) for t, line in run.lines if STEP_LINE.match(line)]
        if timed:
            out["first_step_seconds"] = timed[0][0]
        if len(timed) > 1:
            out["train_images_per_second"] = sum(float(m.group(3)) for _, m in timed[1:]) / (
                len(timed) - 1)
        if not run.ok:
            text = "\n".join(line for _, line in run.lines)
            if not timed and run.returncode in (1, 2) and f"cache_images" in text and \
                    mode in run.last_line():
                return {"not_available": f"--cache_images={mode} refused: {run.last_line()}"}
            out["error"] = f"trainer {run.failure()}"
        elif len(timed) < loops:
            out["error"] = f"trainer ended after {len(timed)} of {loops} loops: {run.last_line()}"
        return out

    def _input(self, row: str, data_dir: str, mode: str, cache_dir: str) -> dict:
        args = self.args
        run = self.child(f"{row}-input", [
            sys.executable, "-m", "bench.scale", "--worker=input", f"--data_dir={data_dir}",
            f"--cache={mode}", f"--cache_dir={cache_dir}", f"--image_size={args.image_size}",
            f"--batch_size={args.batch_size}", f"--input_steps={args.input_steps}",
            f"--input_warmup={args.input_warmup}"])
        if not run.ok:
            return {"input_error": f"input {run.failure()}", "input_peak_gb": run.peak_gb}
        result = json.loads(run.lines[-1][1])
        if "not_available" in result:
            return {"input_error": f"input not available: {result['not_available']}"}
        return {"input_images_per_second": result["images_per_second"],
                "input_warmup_seconds": result["warmup_seconds"],
                "input_peak_gb": run.peak_gb}

    # --- S3 --------------------------------------------------------------------------------
    def sync_rows(self, rows: list[str]) -> dict[str, dict]:
        from tests.s3_server import running_server
        out = {}
        if "sync_packed" in rows:
            self.ensure_packed()
        with running_server(os.path.join(self.work, "s3")) as server:
            server.make_bucket("scale")
            for row in rows:
                folder = self.args.data_dir if row == "sync_folder" else self.args.packed_dir
                name = row.split("_")[1]
                start = time.monotonic()
                objects, size = _upload(server, folder, "scale", name)
                upload = time.monotonic() - start
                dest = os.path.join(self.work, f"synced-{name}")
                env = dict(os.environ, AWS_ACCESS_KEY_ID=server.key,
                           AWS_SECRET_ACCESS_KEY=server.secret, AWS_CONFIG_FILE=os.devnull,
                           AWS_SHARED_CREDENTIALS_FILE=os.devnull)
                run = self.child(row, [sys.executable, "-m", "data.download",
                                       f"--source=s3://scale/{name}", f"--dest={dest}",
                                       f"--s3_endpoint_url={server.endpoint_url}",
                                       "--no_progress"], env=env)
                got = _tree_bytes(dest)
                shutil.rmtree(dest, ignore_errors=True)
                if not run.ok:
                    out[row] = {"error": run.failure(), "peak_gb": run.peak_gb}
                    continue
                if got != (objects, size):
                    out[row] = {"error": f"synced {got[0]} files, {got[1]} bytes; uploaded "
                                         f"{objects}, {size}"}
                    continue
                out[row] = {"seconds": run.seconds, "mb": size / 1e6, "peak_gb": run.peak_gb,
                            "note": f"{objects} objects, 16 transfers at a time; upload "
                                    f"beforehand {upload:.0f} s"}
        return out

    # --- everything --------------------------------------------------------------------------
    def run(self, rows: list[str]) -> dict[str, dict]:
        sync = [r for r in rows if r.startswith("sync_")]
        for row in rows:
            if row in sync:
                continue
            print(f"scale: running {row} ...", file=sys.stderr, flush=True)
            try:
                self.results[row] = (self.row_check() if row == "check" else
                                     self.row_pack() if row == "pack" else self.row_train(row))
            except Exception as error:  # noqa: BLE001 - a row's failure is reported, not fatal
                self.results[row] = {"error": f"{type(error).__name__}: {error}"}
        if sync:
            print(f"scale: running {','.join(sync)} ...", file=sys.stderr, flush=True)
            try:
                self.results.update(self.sync_rows(sync))
            except Exception as error:  # noqa: BLE001
                self.results.update({r: {"error": f"{type(error).__name__}: {error}"}
                                     for r in sync})
        return self.results


def _upload(server, folder: str, bucket: str, prefix: str, batch: int = 2000) -> tuple[int, int]:
    """Every non-hidden file under `folder` to BUCKET/PREFIX/<relative path>, `batch` files at
    a time (the test server's put_objects holds a batch in memory); returns (objects, bytes)."""
    paths = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    size = 0
    for i in range(0, len(paths), batch):
        objects = {}
        for path in paths[i:i + batch]:
            with open(path, "rb") as f:
                objects[f"{prefix}/{os.path.relpath(path, folder)}"] = f.read()
            size += len(objects[f"{prefix}/{os.path.relpath(path, folder)}"])
        server.put_objects(bucket, objects)
    return len(paths), size


# ============================================================================================
# The table
# ============================================================================================
LABELS = {"check": "data check (`data.check`)", "pack": "pack (`data.pack`)",
          "sync_folder": "S3 sync, folder (`data.download`)",
          "sync_packed": "S3 sync, packed shards (`data.download`)"}
for _source in SOURCES:
    for _mode in MODES:
        LABELS[f"{_source}_{_mode}"] = f"{_source}, `--cache_images={_mode}`"


def _number(value, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def table(results: dict[str, dict]) -> str:
    lines = ["| row | first step s | peak RSS GB | input img/s | train img/s | seconds | MB | "
             "notes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in ROWS:
        if row not in results:
            continue
        r = results[row]
        if "not_available" in r:
            note = r["not_available"].replace("|", "/")
            lines.append(f"| {LABELS[row]} | not available | | | | | | {note} |")
            continue
        notes = [n for n in (r.get("error"), r.get("input_error"), r.get("note")) if n]
        if "cache_mb" in r:
            notes.append(f"disk cache {r['cache_mb'] / 1e3:.1f} GB")
        if r.get("input_peak_gb") is not None and not r.get("input_error"):
            notes.append(f"input alone: peak RSS {r['input_peak_gb']:.1f} GB, warm-up "
                         f"{_number(r.get('input_warmup_seconds'), 0) or '-'} s")
        lines.append("| " + " | ".join([
            LABELS[row], _number(r.get("first_step_seconds"), 0),
            _number(r.get("peak_gb"), 1), _number(r.get("input_images_per_second"), 0),
            _number(r.get("train_images_per_second"), 1), _number(r.get("seconds"), 0),
            _number(r.get("mb"), 0 if (r.get("mb") or 0) >= 100 else 1), "; ".join(notes).replace("|", "/")]) + " |")
    return "\n".join(lines)


# ============================================================================================
# Command line
# ============================================================================================
def default_data_dir(scale: float, classes: int, image_size: int) -> str:
    from data import photos
    if (scale, classes, image_size) == (1, photos.BIRDS_CLASSES, 224):
        return os.path.join(DEFAULT_ROOT, "birds")
    return os.path.join(DEFAULT_ROOT, f"birds-{scale:g}x-{classes}c-{image_size}px")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="", help="the birds folder, built when its "
                        f"marker does not match (default: {DEFAULT_ROOT}/birds at full size, "
                        f"{DEFAULT_ROOT}/birds-<scale>x-<classes>c-<size>px otherwise)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the images per class (classes stay), in (0, 1]")
    parser.add_argument("--classes", type=int, default=525, help="the first N classes")
    parser.add_argument("--image_size", type=int, default=224,
                        help="of the JPEGs and of training")
    parser.add_argument("--rebuild", action="store_true",
                        help="replace a birds folder of another size at --data_dir")
    parser.add_argument("--build_only", action="store_true", help="build or reuse, then exit")
    parser.add_argument("--packed_dir", default="",
                        help="packed copy of --data_dir (default: DATA_DIR-packed)")
    parser.add_argument("--work_dir", default="", help="scratch goes into a new folder here, "
                        f"removed at the end (default: {DEFAULT_ROOT}/bench-work)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=10)
    parser.add_argument("--steps_per_loop", type=int, default=2)
    parser.add_argument("--input_steps", type=int, default=200, help="timed input batches")
    parser.add_argument("--input_warmup", type=int, default=5)
    parser.add_argument("--cache_memory_fraction", type=float, default=0.5,
                        help="the trainer's --cache_memory_fraction (0.75 lets the memory rows "
                             "hold the full set's 12.6 GB on a 24 GB machine)")
    parser.add_argument("--max_rss_gb", type=float, default=20.0,
                        help="kill a child whose resident memory exceeds this")
    parser.add_argument("--min_available_gb", type=float, default=1.5,
                        help="kill a child when the machine's MemAvailable falls below this")
    parser.add_argument("--row_timeout", type=float, default=3600.0,
                        help="kill a child running longer than this (seconds)")
    parser.add_argument("--out", default="", help="also write the table (Markdown) here")
    parser.add_argument("--worker", default="", help=argparse_suppress())
    parser.add_argument("--cache", default="none", help=argparse_suppress())
    parser.add_argument("--cache_dir", default="", help=argparse_suppress())
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_input(args)), flush=True)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    rows = [r for r in ROWS if r in rows]
    if not 0 < args.scale <= 1:
        parser.error(f"--scale={args.scale:g}: must be in (0, 1]")
    if not 1 <= args.classes <= 525:
        parser.error(f"--classes={args.classes}: must be 1..525")
    if min(args.image_size, args.batch_size, args.train_steps, args.steps_per_loop,
           args.input_steps) < 1 or args.input_warmup < 0:
        parser.error("--image_size, --batch_size, --train_steps, --steps_per_loop and "
                     "--input_steps must be >= 1, --input_warmup >= 0")
    args.data_dir = os.path.abspath(args.data_dir or default_data_dir(
        args.scale, args.classes, args.image_size))
    args.packed_dir = os.path.abspath(args.packed_dir or args.data_dir.rstrip("/") + "-packed")

    from data import photos
    start = time.monotonic()
    try:
        spec, built = photos.ensure_birds(
            args.data_dir, scale=args.scale, classes=args.classes, image_size=args.image_size,
            rebuild=args.rebuild, log=lambda m: print(f"scale: {m}", file=sys.stderr, flush=True))
    except ValueError as error:
        print(f"bench.scale: {error}", file=sys.stderr)
        return 1
    built_text = f"built in {time.monotonic() - start:.0f} s" if built else "reused"
    counts = spec["counts"]
    files, size = _tree_bytes(args.data_dir, skip_hidden=True)
    head = (f"Data: {args.data_dir} ({built_text}): {spec['classes']} classes, "
            f"{counts['train']:,} / {counts['valid']:,} / {counts['test']:,} train/valid/test "
            f"JPEGs at {spec['image_size']} px, {size / 1e6:,.0f} MB ({_du(args.data_dir)} on "
            f"disk)")
    print(head, file=sys.stderr, flush=True)
    if args.build_only:
        print(head)
        return 0

    work_root = args.work_dir or os.path.join(DEFAULT_ROOT, "bench-work")
    os.makedirs(work_root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="scale-", dir=work_root)
    load = os.getloadavg()[0]
    try:
        results = Bench(args, work).run(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = (f"Machine: {os.cpu_count()} cores, {_total_gb():.0f} GB; load average "
               f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Trainer: "
               f"--model={args.model} --batch_size={args.batch_size} "
               f"--train_steps={args.train_steps} --steps_per_loop={args.steps_per_loop} "
               f"(configs/birds_resnet50.cfg); input alone: {args.input_steps} batches after "
               f"{args.input_warmup}.")
    text = "\n".join([head, machine, "", table(results)]) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def _total_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal")) * 1024 / GB


if __name__ == "__main__":
    sys.exit(main())
