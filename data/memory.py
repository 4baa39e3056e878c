"""Where decoded images can live: the memory this process may use, and the choice of
`--cache_images=auto` (memory when the decoded images fit in a stated share of it, else disk
when the cache folder has room, else none). No TensorFlow, so the choice is made before
anything is decoded.

The memory available is the host's MemAvailable, or less where a cgroup (a container, a
SLURM job, a Kubernetes pod) limits the process: its limit minus its working set (usage less
the page cache it could drop, as the kubelet counts it).
"""
from __future__ import annotations

import dataclasses
import os
import shutil

CACHE_MODES = ("auto", "memory", "disk", "none")
# Kept free on the cache's disk beyond the cache itself (checkpoints, events, other jobs).
DISK_MARGIN_BYTES = 1 << 30


class CacheError(ValueError):
    """A cache mode that cannot work here; str() is one line with the numbers and the way out."""


def decoded_bytes(num_images: int, image_size: int) -> int:
    """uint8 [image_size, image_size, 3] per image."""
    return num_images * image_size * image_size * 3


def size_text(num_bytes: float) -> str:
    """12.6 GB, 394.5 MB, 150 KB."""
    if num_bytes >= 1e8:
        return f"{num_bytes / 1e9:.1f} GB"
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.0f} KB"


def percent(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_value(path: str, names: tuple[str, ...]) -> int:
    try:
        with open(path) as f:
            values = dict(line.split()[:2] for line in f if len(line.split()) >= 2)
    except OSError:
        return 0
    for name in names:
        if values.get(name, "").isdigit():
            return int(values[name])
    return 0


def _cgroup_dirs() -> list[str]:
    """The memory cgroup folders of this process (v2 unified, v1 memory controller): its own
    path, and the mount's root, which is the process's cgroup inside most containers."""
    dirs = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        lines = []
    for _, controllers, path in (line for line in lines if len(line) == 3):
        if controllers == "":
            dirs.append(os.path.join("/sys/fs/cgroup", path.lstrip("/")))
        elif "memory" in controllers.split(","):
            dirs.append(os.path.join("/sys/fs/cgroup/memory", path.lstrip("/")))
    return dirs + ["/sys/fs/cgroup", "/sys/fs/cgroup/memory"]


def _cgroup_available() -> int | None:
    """The least that any memory cgroup of this process leaves it, or None without a limit."""
    left = None
    for directory in _cgroup_dirs():
        limit = _read_int(os.path.join(directory, "memory.max")) or \
            _read_int(os.path.join(directory, "memory.limit_in_bytes"))
        if limit is None or limit >= 1 << 60:  # v1 writes a huge number for no limit
            continue
        usage = _read_int(os.path.join(directory, "memory.current")) or \
            _read_int(os.path.join(directory, "memory.usage_in_bytes")) or 0
        inactive = _stat_value(os.path.join(directory, "memory.stat"),
                               ("inactive_file", "total_inactive_file"))
        room = max(0, limit - max(0, usage - inactive))
        left = room if left is None else min(left, room)
    return left


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def available_memory() -> tuple[int, str]:
    """(bytes this process can still use, where that number comes from)."""
    host, limited = _host_available(), _cgroup_available()
    if limited is not None and limited < host:
        return limited, "cgroup limit"
    return host, "host"


def free_disk(path: str) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = os.path.abspath(path or ".")
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


@dataclasses.dataclass(frozen=True)
class CacheChoice:
    train: str  # memory, disk or none: where decoded training images live
    eval: str  # memory or none: whether the evaluation splits are kept decoded
    line: str  # one start-up line: the choice, the bytes and why


def choose_cache(requested: str, *, num_train: int, num_eval: int, image_size: int,
                 memory: tuple[int, str], memory_fraction: float, disk_free: int,
                 disk_share: float = 1.0, modes: tuple[str, ...] = ("memory", "disk", "none"),
                 why_not: str = "") -> CacheChoice:
    """The cache of `requested` (auto, memory, disk, none) for `num_train` training and
    `num_eval` evaluation images. `memory`: available_memory(); `disk_share`: the part of the
    training set this process's disk cache holds (1 / input pipelines); `modes`: those that can
    serve this run, `why_not` says why the others cannot. Raises CacheError for a mode that
    cannot serve or fit."""
    if requested not in CACHE_MODES:
        raise CacheError(f"--cache_images={requested}: must be one of {', '.join(CACHE_MODES)}")
    available, source = memory
    budget = int(available * memory_fraction)
    train_bytes = decoded_bytes(num_train, image_size)
    disk_bytes = int(train_bytes * disk_share)
    fits = {"memory": train_bytes <= budget,
            "disk": disk_bytes + DISK_MARGIN_BYTES <= disk_free, "none": True}
    if requested != "auto":
        _check_requested(requested, modes, why_not, fits, num_train, image_size, train_bytes,
                         disk_bytes, (budget, available, source, memory_fraction), disk_free)
        train, why = requested, "as asked"
    else:
        train = next((mode for mode in modes if fits[mode]), None)
        if train is None:
            raise CacheError(f"--cache_images=auto: the decoded training images need "
                             f"{size_text(train_bytes)} but the memory budget is {size_text(budget)}, and "
                             f"{why_not}")
        why = _auto_reason(train, modes, why_not, disk_free)
    # Evaluation splits are kept decoded when they fit beside the training cache.
    eval_bytes = decoded_bytes(num_eval, image_size)
    held = train_bytes if train == "memory" else 0
    evaluation = "memory" if requested != "none" and held + eval_bytes <= budget else "none"
    return CacheChoice(train, evaluation,
                       f"cache: {train} ({num_train:,} images x {size_text(decoded_bytes(1, image_size))}"
                       f" = {size_text(train_bytes)}; {size_text(available)} available ({source}), memory "
                       f"budget {percent(memory_fraction)} = {size_text(budget)}; {why}); evaluation "
                       f"splits: {evaluation} ({size_text(eval_bytes)})")


def _auto_reason(train: str, modes, why_not: str, disk_free: int) -> str:
    if train == "memory":
        return "fits the memory budget"
    over = "over the memory budget" if "memory" in modes else why_not
    if train == "disk":
        return f"{over}; {size_text(disk_free)} free under --data_cache_dir"
    if "disk" in modes:
        return f"{over}, and only {size_text(disk_free)} free under --data_cache_dir: decoded at every use"
    return f"{over}; {why_not}: decoded at every use" if "memory" in modes else \
        f"{why_not}: decoded at every use"


def _check_requested(requested, modes, why_not, fits, num_train, image_size, train_bytes,
                     disk_bytes, memory, disk_free) -> None:
    budget, available, source, fraction = memory
    if requested not in modes:
        raise CacheError(f"--cache_images={requested}: {why_not}")
    if requested == "memory" and not fits["memory"]:
        raise CacheError(
            f"--cache_images=memory: the decoded training images need {size_text(train_bytes)} "
            f"({num_train:,} x {image_size}x{image_size}x3 bytes) but the memory budget is "
            f"{size_text(budget)} ({percent(fraction)} of {size_text(available)} available, {source}); use "
            f"--cache_images=auto, disk or none, or a larger --cache_memory_fraction")
    if requested == "disk" and not fits["disk"]:
        raise CacheError(
            f"--cache_images=disk: the disk cache needs {size_text(disk_bytes)} (+{size_text(DISK_MARGIN_BYTES)}"
            f" kept free) under --data_cache_dir, which has {size_text(disk_free)} free; use "
            f"--cache_images=auto or none, or another --data_cache_dir")
