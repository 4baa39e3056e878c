"""Faults of the data around a run (issue 24, items 4 and 6), with real files, real TensorFlow and
a real S3 server on loopback:

- images that decode huge from a small file: bad files of the data check, never decoded;
  the decoders of the caches and evaluation refuse them too (--max_image_pixels);
- a dataset changed under a resume (files added, removed, resized, rewritten at the same size,
  in train or in valid): refused in one line, or accepted with --allow_change=data;
- a restart while S3 is down: trains on a complete local copy, fails on a first start;
- files removed from the bucket: kept and counted, or deleted with --s3_delete_removed.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from data import check, fingerprint, pixels, s3
from tests.conftest import FAST_DEMO_FLAGS, run_trainer


def write_flat_png(path: Path, width: int, height: int) -> None:
    """A 1-bit grey, all-black PNG: width * height pixels (3 bytes each once decoded as RGB)
    in a file of a few tens of KB (rows of zeros compress ~1000:1)."""
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def write_flat_jpeg(path: Path, width: int, height: int) -> None:
    from PIL import Image
    Image.new("RGB", (width, height), (180, 40, 40)).save(path, quality=90)


def copy_splits(demo_dir: Path, dest: Path, per_class: int = 4, classes: int = 3) -> Path:
    """A few images per class of the demo data (train, valid, test)."""
    for split in ("train", "valid", "test"):
        for class_dir in sorted((demo_dir / split).iterdir())[:classes]:
            (dest / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(image, dest / split / class_dir.name / image.name)
    return dest


# ============================================================================================
# Item 6: bounded decoding
# ============================================================================================
@pytest.fixture()
def huge_images(demo_dir, tmp_path):
    data = copy_splits(demo_dir, tmp_path / "data")
    first_class = sorted((data / "train").iterdir())[0]
    write_flat_png(first_class / "huge.png", 20000, 20000)  # 400 megapixels, 1.2 GB as RGB
    write_flat_jpeg(first_class / "large.jpg", 3000, 2000)  # 6 megapixels
    write_flat_jpeg(sorted((data / "valid").iterdir())[0] / "large.jpg", 2000, 1500)
    return data


@pytest.mark.quick
def test_images_over_the_pixel_limit_are_bad_files_never_decoded(huge_images, tmp_path):
    train_class = sorted((huge_images / "train").iterdir())[0].name
    assert (huge_images / "train" / train_class / "huge.png").stat().st_size < 100_000
    assert pixels.header_size(str(huge_images / "train" / train_class / "huge.png")) == \
        (20000, 20000)
    cache = str(tmp_path / "cache.json")
    result = check.scan(str(huge_images), cache_path=cache, max_image_pixels=1_000_000)
    bad = dict(result.report.bad_files)
    over = {rel for rel, reason in bad.items() if "--max_image_pixels=1,000,000" in reason}
    assert over == {f"train/{train_class}/huge.png", f"train/{train_class}/large.jpg",
                    f"valid/{sorted((huge_images / 'valid').iterdir())[0].name}/large.jpg"}
    assert "20000x20000 = 400,000,000 pixels" in bad[f"train/{train_class}/huge.png"]
    assert result.report.decoded == 3 * 3 * 4  # only the demo images were decoded
    assert not any(rel in result.file_info for rel in over)
    assert any("3 bad image file(s) left out" in w for w in result.report.warnings)
    text = result.report.to_text()
    assert "huge.png" in text and "max_image_pixels" in text
    # Not cached as bad: under the default limit the 6-megapixel images decode and pass, and
    # the 400-megapixel one is still refused from its header (never decoded).
    start = time.monotonic()
    again = check.scan(str(huge_images), cache_path=cache)
    seconds = time.monotonic() - start
    bad = dict(again.report.bad_files)
    assert list(bad) == [f"train/{train_class}/huge.png"]
    assert "--max_image_pixels=100,000,000" in bad[f"train/{train_class}/huge.png"]
    assert again.report.decoded == 2
    print(f"rescan with two 6-megapixel decodes and the 400-megapixel refusal: {seconds:.2f} s")


@pytest.mark.quick
def test_the_decoders_of_caches_and_evaluation_refuse_an_image_over_the_limit(huge_images):
    import tensorflow as tf
    from data import datasets, decode
    from data.spec import InputSpec
    train_class = sorted((huge_images / "train").iterdir())[0]
    large = str(train_class / "large.jpg")
    decode.set_max_pixels(1_000_000)
    try:
        for read in (lambda p: decode.read_and_resize(p, 32),  # training, memory/disk cache
                     lambda p: decode.read_for_eval(p, 32, 0.875)):  # evaluation, serving
            with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels"):
                read(tf.constant(large))
        # An evaluation dataset (the path trainer.evaluate and the trainer's evaluations take)
        dataset = datasets.eval_dataset([large], [0], InputSpec(32, 1, eval_cache="none"))
        with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels"):
            next(iter(dataset))
        small = str(sorted(p for p in train_class.iterdir() if p.suffix == ".jpg"
                           and p.name != "large.jpg")[0])
        assert decode.read_and_resize(tf.constant(small), 32).shape == (32, 32, 3)
    finally:
        decode.set_max_pixels(pixels.DEFAULT_MAX_IMAGE_PIXELS)
    assert decode.read_and_resize(tf.constant(large), 32).shape == (32, 32, 3)


# ============================================================================================
# Item 4a: the data under a resume
# ============================================================================================
def _same_size_rewrite(path: Path) -> None:
    """Another JFIF pixel density: other bytes, the same size and the same pixels."""
    raw = bytearray(path.read_bytes())
    assert raw[6:10] == b"JFIF"
    raw[15] ^= 0x03
    path.write_bytes(bytes(raw))


def _config(data: Path, model_dir: Path, **changes):
    from trainer.config import Config
    return dataclasses.replace(Config(data_dir=str(data), model_dir=str(model_dir),
                                      image_size=32), **changes)


@pytest.mark.quick
def test_a_changed_dataset_under_a_resume_is_refused_or_accepted(demo_dir, tmp_path):
    from trainer.loop import inputs
    data, run = copy_splits(demo_dir, tmp_path / "data"), tmp_path / "run"
    lines: list[str] = []
    config = _config(data, run)
    inputs.check_data_fingerprint(config, inputs.read_inputs(config, lines.append), False,
                                  lines.append)
    saved = json.loads((run / fingerprint.FILE_NAME).read_text())
    assert sorted(saved["splits"]) == ["test", "train", "valid"]
    assert len(saved["splits"]["train"]) == 12

    # Unchanged (also a copy with new modification times): accepted without a word.
    shutil.copytree(data, tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
    moved = _config(tmp_path / "copy", run)
    inputs.check_data_fingerprint(moved, inputs.read_inputs(moved, lines.append), True,
                                  lines.append)
    assert not [line for line in lines if "data changed" in line]

    train = sorted((data / "train").iterdir())
    images = sorted(train[0].iterdir())
    _same_size_rewrite(images[0])  # same count, same sizes: only the bytes differ
    with pytest.raises(inputs.TrainingError) as refused:
        inputs.check_data_fingerprint(config, inputs.read_inputs(config, lines.append), True,
                                      lines.append)
    assert str(refused.value).startswith(
        f"--data_dir={data}: train: 1 file changed content (same size) since the run began")

    shutil.copy(images[1], train[1] / "added-1.jpg")
    shutil.copy(images[2], train[1] / "added-2.jpg")
    images[3].unlink()
    with open(sorted(train[2].iterdir())[0], "ab") as f:
        f.write(b"\0" * 10)  # a JPEG with trailing bytes still decodes: changed size
    sorted(sorted((data / "valid").iterdir())[0].iterdir())[0].unlink()
    with pytest.raises(inputs.TrainingError) as refused:
        inputs.check_data_fingerprint(config, inputs.read_inputs(config, lines.append), True,
                                      lines.append)
    message = str(refused.value)
    assert "\n" not in message
    assert ("train: 2 files added, 1 removed, 1 changed size, 1 changed content (same size); "
            "valid: 1 file removed since the run began; pass --allow_change=data") in message
    assert json.loads((run / fingerprint.FILE_NAME).read_text()) == saved  # kept as it was

    allowed = _config(data, run, allow_change="data")
    inputs.check_data_fingerprint(allowed, inputs.read_inputs(allowed, lines.append), True,
                                  lines.append)
    accepted = [line for line in lines if line.startswith("data changed since the run began")]
    assert len(accepted) == 1 and "the step is kept" in accepted[0] and \
        "not the batches it would have been" in accepted[0]
    # The record is now the new data: the next resume on it says nothing.
    assert len(json.loads((run / fingerprint.FILE_NAME).read_text())["splits"]["train"]) == 13
    inputs.check_data_fingerprint(config, inputs.read_inputs(config, lines.append), True,
                                  lines.append)


@pytest.mark.quick
def test_a_changed_packed_dataset_is_seen(tmp_path):
    from data.manifest import Manifest, Shard
    from data.layout import SplitFiles

    def manifest(shard_bytes):
        return Manifest(str(tmp_path), ["a"], {"train": SplitFiles("train", ("x",), (0,))},
                        {"train": (Shard("train-0.tfrecord", (0,), shard_bytes, "ab" * 32),)},
                        0)
    before, after = fingerprint.make_packed(manifest(100)), fingerprint.make_packed(manifest(99))
    assert fingerprint.differences(before, before) == []
    assert fingerprint.differences(before, after) == ["train: 1 file changed size"]
    folder = {"version": 1, "kind": "folder", "splits": {}}
    assert "image folders when the run began and is packed shards now" in \
        fingerprint.differences(folder, before)[0]


def test_the_trainer_refuses_a_changed_dataset_and_accepts_it_when_allowed(small_demo_dir,
                                                                           tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(small_demo_dir, data)
    flags = (f"--data_dir={data}", f"--model_dir={run}", *FAST_DEMO_FLAGS, "--train_steps=2",
             "--steps_per_loop=2", "--distribution_strategy=one_device", "--noexport_at_end",
             "--noeval_figures", "--high_loss_scan=0", "--max_image_pixels=1000000")
    run_trainer(*flags)
    assert (run / fingerprint.FILE_NAME).is_file()
    # trainer.evaluate applies the run's --max_image_pixels (1,000,000, not the default).
    from trainer import evaluate
    from trainer.state.run_dir import SavedRun
    test_class = sorted((data / "test").iterdir())[0]
    write_flat_jpeg(test_class / "large.jpg", 2000, 1000)
    evaluated = evaluate._split_files(str(data), SavedRun.load(str(run)), "test")
    assert str(test_class / "large.jpg") not in evaluated.files and len(evaluated) == 80
    (test_class / "large.jpg").unlink()
    class_dir = sorted((data / "train").iterdir())[0]
    shutil.copy(sorted(class_dir.iterdir())[0], class_dir / "added.jpg")
    start = time.monotonic()
    refused = run_trainer(*flags, check=False)
    seconds = time.monotonic() - start
    assert refused.returncode == 1, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if "since the run began" in line]
    assert len(errors) == 1 and "train: 1 file added since the run began" in errors[0], \
        refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    accepted = run_trainer(*flags, "--allow_change=data")
    assert "data changed since the run began (--allow_change=data): train: 1 file added" \
        in accepted.stdout
    assert "is finished" in accepted.stdout
    print(f"refused resume: exit 1 after {seconds:.1f} s")


# ============================================================================================
# Items 4b and 4c: S3 down at a restart; files removed from the bucket
# ============================================================================================
def _upload_small_dataset(server, bucket: str, source: Path) -> None:
    server.make_bucket(bucket, public=True)
    server.upload_tree(str(source), bucket, "birds")


def test_a_restart_with_a_complete_local_copy_trains_while_s3_is_down(demo_dir, tmp_path):
    from tests.s3_server import start_server
    from trainer.loop import inputs
    source = copy_splits(demo_dir, tmp_path / "source", per_class=2, classes=2)
    server = start_server(tmp_path / "server")
    try:
        _upload_small_dataset(server, "down-test", source)
        lines: list[str] = []
        config = _config("s3://down-test/birds", tmp_path / "run",
                         data_cache_dir=str(tmp_path / "cache"), s3_anon=True,
                         s3_endpoint_url=server.endpoint_url)
        local = inputs.sync_from_s3(config, lines.append)
        record = s3.read_sync_record(local, "s3://down-test/birds/")
        assert record is not None and record["files"] == 12
    finally:
        server.stop()
    start = time.monotonic()
    assert inputs.sync_from_s3(config, lines.append) == local
    seconds = time.monotonic() - start
    fallback = [line for line in lines if line.startswith("could not check S3 for changes")]
    assert len(fallback) == 1, lines
    assert f"training on the local copy from {record['finished']}" in fallback[0]
    assert "cannot connect to" in fallback[0]
    # A first start (no local copy; also a copy without the record, see the next test): one
    # line, exit 1 in the trainer.
    with pytest.raises(inputs.TrainingError) as failed:
        inputs.sync_from_s3(dataclasses.replace(config, data_cache_dir=str(tmp_path / "new")),
                            lines.append)
    assert str(failed.value).startswith("--data_dir: s3://down-test/birds/: cannot connect")
    assert "\n" not in str(failed.value)
    print(f"restart with S3 down: went on after {seconds:.1f} s")


def test_files_removed_from_the_bucket_are_kept_or_deleted(s3_server, demo_dir, tmp_path):
    from data import download
    source = copy_splits(demo_dir, tmp_path / "source", per_class=2, classes=2)
    _upload_small_dataset(s3_server, "removed-test", source)
    dest = tmp_path / "copy"
    options = dict(anon=True, endpoint_url=s3_server.endpoint_url, progress=False)
    assert s3.sync("s3://removed-test/birds", str(dest), **options).downloaded == 12
    (dest / ".check_cache.json").write_text("{}")  # the data check's, never the bucket's
    removed_class = sorted((dest / "train").iterdir())[1].name
    fs = s3_server.filesystem()
    fs.rm(f"removed-test/birds/train/{removed_class}", recursive=True)

    kept = s3.sync("s3://removed-test/birds", str(dest), **options)
    assert kept.not_in_bucket == 2
    assert "; 2 local files no longer in the bucket: kept (--s3_delete_removed deletes them)" \
        in kept.describe()
    assert (dest / "train" / removed_class).is_dir()
    assert s3.read_sync_record(str(dest)) is not None  # complete: every object is here

    status = download.main(["--source=s3://removed-test/birds", f"--dest={dest}", "--s3_anon",
                            f"--s3_endpoint_url={s3_server.endpoint_url}", "--no_progress",
                            "--s3_delete_removed"])
    assert status == 0
    assert not (dest / "train" / removed_class).exists()  # the files and their class folder
    assert (dest / ".check_cache.json").is_file()
    again = s3.sync("s3://removed-test/birds", str(dest), **options, delete_removed=True)
    assert again.not_in_bucket == 0 and again.skipped == 10
    assert "no longer in the bucket" not in again.describe()


def test_a_sync_that_does_not_finish_leaves_no_completion_record(s3_server, demo_dir, tmp_path):
    source = copy_splits(demo_dir, tmp_path / "source", per_class=1, classes=2)
    _upload_small_dataset(s3_server, "unfinished-test", source)
    dest = tmp_path / "copy"
    options = dict(anon=True, endpoint_url=s3_server.endpoint_url, progress=False)
    assert s3.sync("s3://unfinished-test/birds", str(dest), **options).ok
    assert s3.read_sync_record(str(dest), "s3://unfinished-test/birds/") is not None
    # New objects: one to fetch, one whose key is refused (named like a temporary download
    # file): the copy is changed and not complete, so it must not claim to be.
    image = next((source / "train").rglob("*.jpg")).read_bytes()
    s3_server.put_objects("unfinished-test", {"birds/train/new/new.jpg": image,
                                              "birds/train/new/.x.jpg.part-0123abcd": image})
    summary = s3.sync("s3://unfinished-test/birds", str(dest), **options)
    assert summary.downloaded == 1 and not summary.ok
    assert s3.read_sync_record(str(dest)) is None
