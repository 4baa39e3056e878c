"""Packed data (data/pack.py, data/packed.py) and the disk cache (data/diskcache.py): the same
items as the folder, the same batches where the order is defined to match, exact resume after
SIGKILL, one-line errors for bad shards, and a disk cache that is reused or rebuilt."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data import check, datasets, manifest, pack, source
from data.augment import Augment
from data.spec import InputSpec
from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer
from tests.test_resume import _kill_after_step, _latest_step, _model_variables
from trainer.loop.actions import StepLossLog


@pytest.fixture(scope="module")
def packed_dir(demo_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("packed") / "demo"
    pack.pack(str(demo_dir), str(dest), shard_mb=0.04, log=lambda m: None)
    return dest


@pytest.fixture(scope="module")
def small_packed_dir(small_demo_dir, tmp_path_factory):
    """small_demo_dir packed: 10 steps per epoch at global batch 32, 80 test images."""
    dest = tmp_path_factory.mktemp("small_packed") / "demo"
    pack.pack(str(small_demo_dir), str(dest), shard_mb=0.04, log=lambda m: None)
    return dest


def _folder_splits(demo_dir):
    return check.scan(str(demo_dir), cache_path=check.default_cache_path(str(demo_dir))).splits


def _batches(dataset):
    return [(images.numpy(), labels.numpy()) for images, labels, _ in dataset]


def test_packed_data_holds_the_folder_images_and_trains_on_the_same_batches(demo_dir,
                                                                            packed_dir):
    folder = _folder_splits(demo_dir)
    packed = source.open_source(str(packed_dir))
    assert packed.kind == "packed" and len(packed.manifest.shards["train"]) > 8
    for name, split in folder.items():
        items = {(os.path.relpath(f, demo_dir), y) for f, y in zip(split.files, split.labels)}
        assert set(zip(packed.manifest.splits[name].files,
                       packed.manifest.splits[name].labels)) == items
        # The same pixels for every image, as sets (evaluation: every image once).
        folder_images = datasets.eval_dataset(split.files, split.labels, InputSpec(32, 64))
        packed_images = packed.eval_dataset(packed.manifest.splits[name], InputSpec(32, 64))

        def rows(dataset):
            out = set()
            for images, labels, weights in dataset:
                keep = weights.numpy() > 0
                out |= {(image.tobytes(), label) for image, label in
                        zip(images.numpy()[keep], labels.numpy()[keep])}
            return out
        assert rows(packed_images) == rows(folder_images)
        assert len(rows(folder_images)) > 0.9 * len(split)  # digits repeat rarely
    # cache=memory: the order is defined over item positions, as for the folder: same batches.
    spec = InputSpec(32, 32, seed=5, augment=Augment(crop_min_area=0.6, flip=True),
                     cache="memory")
    from_folder = _batches(datasets.train_dataset(folder["train"].files, folder["train"].labels,
                                                  spec, total_steps=45))
    from_packed = _batches(packed.train_dataset(packed.manifest.splits["train"], spec,
                                                total_steps=45))
    assert len(from_folder) == len(from_packed) == 45
    for (a, y), (b, z) in zip(from_folder, from_packed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(y, z)


def test_grouped_order_visits_each_item_once_per_epoch_and_resumes_mid_epoch(packed_dir):
    packed = source.open_source(str(packed_dir))
    train = packed.manifest.splits["train"]
    spec = InputSpec(8, 20, seed=1, augment=Augment(crop_min_area=1.0, flip=False),
                     cache="none")
    epoch_steps = len(train) // 20  # 62
    whole = _batches(packed.train_dataset(train, spec, start_step=0, total_steps=2 * 62))
    # One epoch: 1240 distinct images of the 1258 (the last partial batch dropped).
    first_epoch = np.concatenate([images for images, _ in whole[:epoch_steps]])
    assert len({image.tobytes() for image in first_epoch}) == epoch_steps * 20
    assert not np.array_equal(whole[0][0], whole[epoch_steps][0])  # a new order per epoch
    resumed = _batches(packed.train_dataset(train, spec, start_step=epoch_steps + 17,
                                            total_steps=2 * 62))
    assert len(resumed) == epoch_steps - 17
    for (a, y), (b, z) in zip(whole[epoch_steps + 17:], resumed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(y, z)


def test_pack_again_skips_finished_shards(demo_dir, packed_dir, tmp_path):
    dest = tmp_path / "again"
    shutil.copytree(packed_dir, dest)
    (dest / manifest.MANIFEST).unlink()
    lost = manifest.read_manifest(str(packed_dir)).shards["valid"][1].file
    os.remove(dest / lost)  # as if killed while packing valid
    lines = []
    pack.pack(str(demo_dir), str(dest), shard_mb=0.04, log=lines.append)
    assert [line.split()[2] for line in lines if line.startswith("pack: wrote")] == [lost]
    assert manifest.read_manifest(str(dest)).splits == manifest.read_manifest(
        str(packed_dir)).splits


EXACT = (*FAST_DEMO_FLAGS[:-1], "--steps_per_loop=2", "--train_steps=16",
         "--checkpoint_every_steps=4", "--eval_every_steps=8", "--deterministic",
         "--distribution_strategy=mirrored", "--cpu_devices=2", "--noeval_figures",
         "--noexport_at_end", "--cache_images=none", "--high_loss_scan=0")


# One kill on packed data: that the state of several kills (one of them during a save) resumes
# exactly is test_resume's three-kill test on folder data; here what the packed reader adds
# (its shard order, resumed mid-epoch).
def test_sigkill_mid_epoch_on_packed_data_resumes_bit_identical(small_packed_dir, tmp_path):
    assert len(manifest.read_manifest(str(small_packed_dir)).shards["train"]) > 4
    flags = (f"--data_dir={small_packed_dir}", *EXACT)
    whole = tmp_path / "whole"
    run_trainer(f"--model_dir={whole}", *flags)
    parts = tmp_path / "parts"
    killed = _kill_after_step(parts, flags, 6)  # before step 8's checkpoint
    saved = _latest_step(parts / "checkpoints")
    assert killed < 8 and 0 < saved < killed, (killed, saved)
    result = run_trainer(f"--model_dir={parts}", *flags)
    # mid-epoch (an epoch is 10 steps): the packed reader must resume inside its shard order
    assert f"at step {saved} (epoch 1, batch {saved} of the epoch)" in result.stdout, \
        result.stdout[-2000:]
    expected, actual = _model_variables(whole / "checkpoints"), _model_variables(
        parts / "checkpoints")
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert StepLossLog.read(parts / "step_losses.tsv") == StepLossLog.read(
        whole / "step_losses.tsv")
    assert (parts / "data_report.txt").exists()
    # trainer.evaluate reads the run's packed data too: every test image once.
    evaluated = subprocess.run([sys.executable, "-m", "trainer.evaluate", f"--model_dir={whole}"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "on test: 80 images" in evaluated.stdout


def test_a_truncated_or_corrupt_shard_is_one_line_naming_it(packed_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed_dir, bad)
    shard = bad / manifest.read_manifest(str(bad)).shards["train"][3].file
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    flags = (f"--data_dir={bad}", f"--model_dir={tmp_path / 'run'}", *FAST_DEMO_FLAGS,
             "--train_steps=2", "--distribution_strategy=one_device")
    result = run_trainer(*flags, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"trainer: packed shard {shard}: {len(data) // 2} bytes, the manifest says {len(data)} "
        f"(truncated or replaced; re-run data.pack or the sync)")
    checked = subprocess.run([sys.executable, "-m", "data.check", f"--data_dir={bad}"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1 and checked.stderr.strip().startswith(
        f"data.check: packed shard {shard}: ") and len(checked.stderr.strip().splitlines()) == 1
    # Same size, one byte changed: the checksum finds it.
    shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(manifest.DataError, match=f"packed shard {shard}: SHA-256 differs"):
        source.open_source(str(bad))


def test_disk_cache_is_reused_then_rebuilt_when_a_source_file_changes(demo_dir, tmp_path):
    split = _folder_splits(demo_dir)["valid"]
    files = [str(tmp_path / "data" / f"{i:03d}.jpg") for i in range(256)]  # 8 batches of 32
    os.makedirs(tmp_path / "data")
    for src, dst in zip(split.files, files):
        shutil.copyfile(src, dst)

    spec = InputSpec(16, 32, augment=Augment(crop_min_area=1.0, flip=False), cache="disk",
                     cache_dir=str(tmp_path / "cache"))

    def epoch(log):
        return _batches(datasets.train_dataset(files, split.labels[:256], spec, total_steps=8,
                                               log=log))
    lines = []
    first = epoch(lines.append)
    assert lines[0].startswith("disk cache: building")
    lines.clear()
    second = epoch(lines.append)
    assert len(lines) == 1 and lines[0].startswith("disk cache: reusing"), lines
    for (a, y), (b, z) in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # The streamed images are the ones decoded from the files.
    streamed = _batches(datasets.train_dataset(
        files, split.labels[:256], dataclasses.replace(spec, cache="none"), total_steps=8))
    assert sorted(i.tobytes() for b, _ in streamed for i in b) == sorted(
        i.tobytes() for b, _ in first for i in b)
    # A source file replaced by another image: the cache is rebuilt, never reused stale.
    shutil.copyfile(files[1], files[0])
    lines.clear()
    third = epoch(lines.append)
    assert lines[0].startswith("disk cache: rebuilding"), lines
    changed = {i.tobytes() for b, _ in third for i in b}
    assert {i.tobytes() for b, _ in first for i in b} != changed
