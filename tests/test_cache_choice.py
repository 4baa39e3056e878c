"""--cache_images=auto (data/memory.py): the choice by the numbers, in a real trainer (a small
memory budget picks the disk cache, an explicit memory cache that cannot fit is refused before
anything is decoded, a resume that chooses otherwise says so), and the memory cache holding
each image once (peak RSS measured in a fresh process)."""
import json
import subprocess
import sys

import pytest

from data import memory
from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer

GB = 10 ** 9


def choose(requested="auto", *, num_train=84_000, image_size=224, available=20 * GB,
           fraction=0.5, disk_free=60 * GB, **extra):
    return memory.choose_cache(requested, num_train=num_train, num_eval=5_250,
                               image_size=image_size, memory=(available, "host"),
                               memory_fraction=fraction, disk_free=disk_free, **extra)


def test_auto_picks_memory_then_disk_then_none_by_the_numbers():
    # The reference job: 84,000 x 224x224x3 = 12.6 GB.
    big = choose(available=40 * GB)
    assert (big.train, big.eval) == ("memory", "memory")
    assert "12.6 GB" in big.line and "fits the memory budget" in big.line
    over = choose(available=20 * GB)
    assert (over.train, over.eval) == ("disk", "memory")
    assert over.line.startswith("cache: disk (84,000 images x 151 KB = 12.6 GB; 20.0 GB "
                                "available (host), memory budget 50% = 10.0 GB; over the "
                                "memory budget; 60.0 GB free under --data_cache_dir)"), over.line
    assert choose(available=20 * GB, disk_free=10 * GB).train == "none"
    # Balanced sampling reads images one by one: never the disk cache.
    assert choose(available=20 * GB, modes=("memory", "none"), why_not="balanced").train == \
        "none"
    # The evaluation splits (5,250 x 151 KB = 0.8 GB) only when they fit beside the rest.
    assert choose(available=1.5 * GB).eval == "none"
    assert choose("none", available=40 * GB).eval == "none"


def test_an_explicit_cache_that_cannot_fit_is_refused_in_one_line():
    with pytest.raises(memory.CacheError) as refused:
        choose("memory", available=20 * GB)
    message = str(refused.value)
    assert "\n" not in message and "12.6 GB" in message and "10.0 GB" in message
    assert "--cache_images=auto, disk or none" in message
    with pytest.raises(memory.CacheError, match="disk cache needs 12.6 GB"):
        choose("disk", disk_free=5 * GB)
    # A disk cache split over 4 workers' pipelines needs a quarter of the room on each.
    assert choose("disk", disk_free=5 * GB, disk_share=0.25).train == "disk"


def test_available_memory_is_read_from_this_machine():
    available, source = memory.available_memory()
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < available <= total and source in ("host", "cgroup limit")


def _plan(model_dir):
    return json.loads((model_dir / "plan.json").read_text())


def test_trainer_auto_picks_disk_under_a_small_budget_and_refuses_memory_early(
        small_demo_dir, tmp_path):
    flags = (f"--data_dir={small_demo_dir}", *FAST_DEMO_FLAGS, "--train_steps=4",
             "--cpu_devices=2", f"--data_cache_dir={tmp_path / 'cache'}", "--noexport_at_end",
             "--high_loss_scan=0", "--noeval_figures")
    # 320 images of 32x32x3 = 983 KB; a budget of 0.001% of this host's memory is far less.
    run = tmp_path / "run"
    result = run_trainer(f"--model_dir={run}", *flags, "--cache_memory_fraction=0.00001")
    line = next(x for x in result.stdout.splitlines() if x.startswith("cache: "))
    assert line.startswith("cache: disk (320 images x 3 KB = 983 KB;") and \
        "over the memory budget" in line, line
    assert (_plan(run)["cache_images"], _plan(run)["cache"]) == ("disk", line)
    assert list((tmp_path / "cache" / "decoded").iterdir()), "no disk cache was built"

    refused = run_trainer(f"--model_dir={tmp_path / 'refused'}", *flags,
                          "--cache_images=memory", "--cache_memory_fraction=0.00001",
                          check=False)
    assert refused.returncode == 1
    lines = [x for x in refused.stderr.splitlines() + refused.stdout.splitlines()
             if "cache_images=memory" in x]
    assert len(lines) == 1 and "983 KB" in lines[0] and "Traceback" not in refused.stderr
    # Stopped before the data check decoded anything: it writes its report when done.
    assert not (tmp_path / "refused" / "data_report.txt").exists()

    # The same run resumed with room to spare: memory now, and one line says what changes.
    resumed = run_trainer(f"--model_dir={run}", *flags, "--train_steps=6",
                          "--allow_change=train_steps")
    assert "cache: memory this time (disk when the run last started)" in resumed.stdout
    assert _plan(run)["cache_images"] == "memory"


@pytest.fixture(scope="module")
def mid_sized_photos(tmp_path_factory):
    """3,000 training JPEGs: 230 MB decoded at 160 px, large against the measuring noise."""
    from data import photos
    dest = tmp_path_factory.mktemp("mid") / "photos"
    photos.build(str(dest), image_size=160, num_classes=10, per_class=300, eval_per_class=1)
    return dest


def _input_peak_kb(data_dir, cache: str) -> int:
    out = subprocess.run([sys.executable, "-m", "tests.cache_memory_probe", str(data_dir),
                          "160", cache], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    baseline, peak = int(out[-2]), int(out[-1])
    return (peak - baseline) * 1024


def test_memory_cache_holds_each_image_once(mid_sized_photos):
    cache_bytes = memory.decoded_bytes(3000, 160)
    without = _input_peak_kb(mid_sized_photos, "none")
    cached = _input_peak_kb(mid_sized_photos, "memory")
    # The pipeline's own buffers are in both; what the cache adds is its images, once.
    added = cached - without
    assert 0.8 * cache_bytes <= added <= 1.2 * cache_bytes, (added / cache_bytes, cache_bytes)


def test_progress_prints_count_rate_and_eta_every_few_seconds_and_nothing_when_quick():
    from data.progress import Progress
    now = [0.0]
    lines = []
    progress = Progress("memory cache", 1000, lines.append, clock=lambda: now[0])
    for _ in range(10):  # 100 images a second for 10 s
        now[0] += 1
        progress.update(100)
    progress.close()
    assert lines == ["memory cache: 500/1,000 images (50%, 100/s, ETA 0:00:05)",
                     "memory cache: 1,000/1,000 images (100%, 100/s, ETA 0:00:00)",
                     "memory cache: 1,000 images in 0:00:10"]
    quiet = []
    quick = Progress("memory cache", 10, quiet.append, clock=lambda: 0.0)
    quick.update(10)
    quick.close()
    assert quiet == []
