"""The data check (data/check.py) on a dataset with every real-world defect of issue 4, the
decoder on every image variant, and the trainer on that dataset (real subprocesses)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_trainer

pytestmark = pytest.mark.quick

PARAKETT_TRAIN = "PARAKETT  AUKLET"  # double space in train ...
PARAKETT_VALID = "PARAKETT AUKLET"  # ... single space in valid
WARBLER = "BLACK & WHITE WARBLER"
ANNA = "ANNA'S HUMMINGBIRD"
WOODPECKER = "RED-HEADED WOODPECKER"
TRAIN_CLASSES = sorted([PARAKETT_TRAIN, WARBLER, ANNA, WOODPECKER])
EXTRA_VALID_CLASS = "ZEBRA DOVE"  # 61 classes in valid, 60 in train

# Files training must leave out, with the reason the report must give.
BAD = {
    f"train/{PARAKETT_TRAIN}/empty.jpg": "empty file",
    f"train/{PARAKETT_TRAIN}/truncated.jpg": "truncated JPEG",
    f"train/{WARBLER}/error_page.jpg": "HTML page",
    f"train/{WOODPECKER}/scan.jpg": "TIFF",
    f"train/{WOODPECKER}/one_bit.bmp": "corrupt or unsupported BMP",
    f"valid/{WOODPECKER}/error_page.jpg": "HTML page",
}
# Readable files in unusual forms: (path, format the report must see, width x height).
UNUSUAL = {
    f"train/{WARBLER}/png_named.jpg": ("png", "32x32"),
    f"train/{WARBLER}/gif_named.jpg": ("gif", "32x32"),
    f"train/{WARBLER}/bmp_named.jpg": ("bmp", "32x32"),
    f"train/{WARBLER}/palette_bmp_named.jpg": ("bmp", "32x32"),
    f"train/{ANNA}/cmyk.jpg": ("jpeg", "32x32"),
    f"train/{ANNA}/gray.jpg": ("jpeg", "32x32"),
    f"train/{ANNA}/rgba.png": ("png", "32x32"),
    f"train/{ANNA}/palette.png": ("png", "32x32"),
    f"train/{ANNA}/odd_size.jpg": ("jpeg", "50x37"),
}
IGNORED = {
    "birds.csv": "file at the dataset root",
    ".DS_Store": "hidden file",
    f"train/{ANNA}/.DS_Store": "hidden file",
    f"train/{ANNA}/notes.txt": "not an image file name",
    "train/labels.txt": "file directly in the split folder",
}


def _photo(index: int, size=(32, 32)):
    """A real photograph crop (scikit-learn's sample images), different for each index."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    photo = photos[index % 2]
    y, x = (index * 37) % 300, (index * 53) % 500
    return Image.fromarray(photo[y:y + 120, x:x + 120]).resize(size, Image.Resampling.BILINEAR)


def _encode(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def build_messy_dataset(root: Path) -> Path:
    counter = iter(range(10_000))

    def write(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def good_jpegs(split: str, folder: str, count: int) -> None:
        for i in range(count):
            write(f"{split}/{folder}/img_{i}.jpg", _encode(_photo(next(counter)), "JPEG"))

    for folder in TRAIN_CLASSES:
        good_jpegs("train", folder, 4)
    for folder in (PARAKETT_VALID, WARBLER, ANNA, EXTRA_VALID_CLASS):
        good_jpegs("valid", folder, 2)
    photo = _photo(next(counter))
    whole = _encode(photo, "JPEG")
    write(f"train/{PARAKETT_TRAIN}/empty.jpg", b"")
    write(f"train/{PARAKETT_TRAIN}/truncated.jpg", whole[: len(whole) // 2])
    write(f"train/{WARBLER}/error_page.jpg",
          b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>\n")
    write(f"train/{WOODPECKER}/scan.jpg", _encode(photo, "TIFF"))
    write(f"train/{WOODPECKER}/one_bit.bmp", _encode(photo.convert("1"), "BMP"))
    write(f"valid/{WOODPECKER}/error_page.jpg", b"<html><body>404 Not Found</body></html>")
    write(f"train/{WARBLER}/png_named.jpg", _encode(photo, "PNG"))
    write(f"train/{WARBLER}/gif_named.jpg", _encode(photo.convert("P"), "GIF"))
    write(f"train/{WARBLER}/bmp_named.jpg", _encode(photo, "BMP"))
    write(f"train/{WARBLER}/palette_bmp_named.jpg", _encode(photo.convert("P"), "BMP"))
    write(f"train/{ANNA}/cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG"))
    write(f"train/{ANNA}/gray.jpg", _encode(photo.convert("L"), "JPEG"))
    write(f"train/{ANNA}/rgba.png", _encode(photo.convert("RGBA"), "PNG"))
    write(f"train/{ANNA}/palette.png", _encode(photo.convert("P"), "PNG"))
    write(f"train/{ANNA}/odd_size.jpg", _encode(_photo(next(counter), (50, 37)), "JPEG"))
    write("birds.csv", b"filepaths,labels,data set\n")
    write(".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(f"train/{ANNA}/.DS_Store", b"\x00\x00\x00\x01Bud1")
    write(f"train/{ANNA}/notes.txt", b"downloaded from kaggle\n")
    write("train/labels.txt", b"a list\n")
    return root


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory) -> Path:
    return build_messy_dataset(tmp_path_factory.mktemp("messy") / "birds")


@pytest.fixture(scope="module")
def messy_scan(messy_dir, tmp_path_factory):
    from data import check
    return check.scan(str(messy_dir), skip_unknown_classes=True,
                      cache_path=str(tmp_path_factory.mktemp("cache") / "cache.json"))


# ============================================================================================
# The decoder: every image variant becomes RGB at the target size with the right pixels
# ============================================================================================
@pytest.mark.parametrize("variant, tolerance", [
    ("jpeg", 3.0), ("gray_jpeg", 3.0), ("cmyk_jpeg", 3.0), ("progressive_jpeg", 3.0),
    ("png", 0.0), ("rgba_png", 0.0), ("palette_png", 0.0), ("gray_alpha_png", 0.0),
    ("16bit_png", 0.0), ("gif", 0.0), ("animated_gif", 0.0), ("bmp", 0.0), ("rgba_bmp", 0.0),
    ("gray_bmp", 0.0), ("palette_bmp", 0.0)])
def test_decode_gives_rgb_pixels_of_every_variant(variant, tolerance):
    import tensorflow as tf
    from PIL import Image

    from data import decode
    photo = _photo(7, (50, 37))
    encoders = {
        "jpeg": lambda: _encode(photo, "JPEG", quality=95),
        "gray_jpeg": lambda: _encode(photo.convert("L"), "JPEG", quality=95),
        "cmyk_jpeg": lambda: _encode(photo.convert("CMYK"), "JPEG", quality=95),
        "progressive_jpeg": lambda: _encode(photo, "JPEG", quality=95, progressive=True),
        "png": lambda: _encode(photo, "PNG"),
        "rgba_png": lambda: _encode(photo.convert("RGBA"), "PNG"),
        "palette_png": lambda: _encode(photo.convert("P"), "PNG"),
        "gray_alpha_png": lambda: _encode(photo.convert("LA"), "PNG"),
        "16bit_png": lambda: _encode(Image.fromarray(
            np.asarray(photo.convert("L")).astype(np.uint16) * 257), "PNG"),
        "gif": lambda: _encode(photo.convert("P"), "GIF"),
        "animated_gif": lambda: _encode(photo.convert("P"), "GIF", save_all=True,
                                        append_images=[photo.rotate(90).convert("P")]),
        "bmp": lambda: _encode(photo, "BMP"),
        "rgba_bmp": lambda: _encode(photo.convert("RGBA"), "BMP"),
        "gray_bmp": lambda: _encode(photo.convert("L"), "BMP"),
        "palette_bmp": lambda: _encode(photo.convert("P"), "BMP"),
    }
    data = encoders[variant]()
    with Image.open(io.BytesIO(data)) as reference:
        if reference.mode == "I;16":
            expected = (np.asarray(reference).astype(np.float64) / 257).round()
            expected = np.repeat(expected[..., None], 3, axis=2)
        else:
            expected = np.asarray(reference.convert("RGB")).astype(np.float64)
    decoded = decode.decode_rgb(tf.constant(data)).numpy()
    assert decoded.shape == (37, 50, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded - expected).mean() <= tolerance
    resized = decode.decode_and_resize(tf.constant(data), 24).numpy()
    assert resized.shape == (24, 24, 3) and resized.dtype == np.uint8


# ============================================================================================
# The report
# ============================================================================================
def test_report_names_every_bad_and_ignored_file_with_its_reason(messy_scan):
    report = messy_scan.report
    bad = dict(report.bad_files)
    assert set(bad) == set(BAD)
    for path, reason in BAD.items():
        assert reason in bad[path], (path, bad[path])
    ignored = dict(report.ignored + [i for s in report.splits.values() for i in s.ignored])
    for path, reason in IGNORED.items():
        assert reason in ignored[path], (path, ignored.get(path))
    text = report.to_text()
    for path in [*BAD, *IGNORED]:
        assert path in text


def test_unusual_images_are_read_and_reported_by_their_content(messy_scan):
    train = messy_scan.report.splits["train"]
    misnamed = dict(train.misnamed)
    for path, (fmt, _) in UNUSUAL.items():
        if not path.endswith(".png"):
            assert (misnamed.get(path) == fmt) == (fmt != "jpeg"), path
    assert train.sizes["50x37"] == 1
    assert train.sizes["32x32"] == 16 + len(UNUSUAL) - 1
    kept = {os.path.relpath(f, messy_scan.report.data_dir)
            for f in messy_scan.splits["train"].files}
    assert set(UNUSUAL) <= kept
    assert not set(BAD) & kept


def test_classes_are_matched_by_name_across_splits(messy_scan):
    report = messy_scan.report
    assert messy_scan.class_names == TRAIN_CLASSES
    valid = report.splits["valid"]
    assert valid.renamed == [(PARAKETT_VALID, PARAKETT_TRAIN)]
    assert valid.unknown_classes == [EXTRA_VALID_CLASS]
    assert valid.classes[WOODPECKER] == 0  # only an error page: reported by name
    assert any(WOODPECKER in w and "no readable image" in w for w in report.warnings)
    assert any(repr(PARAKETT_VALID) in w and repr(PARAKETT_TRAIN) in w for w in report.warnings)
    files = messy_scan.splits["valid"]
    names = {os.path.basename(os.path.dirname(f)) for f in files.files}
    assert EXTRA_VALID_CLASS not in names
    # Labels by name: every valid image carries the label of its train class.
    for path, label in zip(files.files, files.labels):
        folder = os.path.basename(os.path.dirname(path))
        assert " ".join(TRAIN_CLASSES[label].split()) == " ".join(folder.split())
    per_class = report.to_dict()["splits"]["train"]["per_class"]
    assert per_class["min"] == 4 and per_class["max"] == 9
    assert report.errors == []


def test_without_skip_the_extra_valid_class_is_an_error_naming_it(messy_dir, tmp_path):
    from data import check
    result = check.scan(str(messy_dir), cache_path=str(tmp_path / "cache.json"))
    assert len(result.report.errors) == 1
    assert repr(EXTRA_VALID_CLASS) in result.report.errors[0]
    assert "--skip_unknown_classes" in result.report.errors[0]


def test_a_train_class_without_a_readable_image_and_an_empty_split_are_errors(tmp_path):
    from data import check
    root = tmp_path / "data"
    for i, name in enumerate(["GOOD", "BROKEN"]):
        (root / "train" / name).mkdir(parents=True)
        (root / "valid" / name).mkdir(parents=True)
    (root / "train" / "GOOD" / "a.jpg").write_bytes(_encode(_photo(0), "JPEG"))
    (root / "train" / "BROKEN" / "a.jpg").write_bytes(b"")
    (root / "valid" / "GOOD" / "a.jpg").write_bytes(b"<html></html>")
    errors = check.scan(str(root)).report.errors
    assert any("'BROKEN'" in e and "no readable image" in e for e in errors), errors
    assert any("split 'valid'" in e and "no readable images" in e for e in errors), errors


def test_a_file_name_that_is_not_utf8_is_left_out_by_name(tmp_path):
    from data import check
    root = tmp_path / "data"
    for split in ("train", "valid"):
        (root / split / "GOOD").mkdir(parents=True)
        (root / split / "GOOD" / "a.jpg").write_bytes(_encode(_photo(0), "JPEG"))
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, e.g. from a zip made on Windows
    (root / "train" / "GOOD" / name).write_bytes(_encode(_photo(1), "JPEG"))
    result = check.scan(str(root))
    assert dict(result.report.bad_files) == {
        f"train/GOOD/{name}": "the file name is not valid UTF-8, which TensorFlow needs "
                              "(rename it)"}
    assert result.splits["train"].files == (str(root / "train" / "GOOD" / "a.jpg"),)
    assert result.report.errors == []
    text = result.report.to_text().encode("utf-8", "backslashreplace").decode()
    assert "caf\\udce9.jpg" in text


def test_second_scan_decodes_only_changed_files(messy_dir, tmp_path):
    from data import check
    data = tmp_path / "data"
    shutil.copytree(messy_dir, data, ignore=shutil.ignore_patterns(".check_cache.json"))
    cache = check.default_cache_path(str(data))
    assert cache == str(data / check.CACHE_NAME)
    first = check.scan(str(data), skip_unknown_classes=True, cache_path=cache)
    assert first.report.decoded == 39 and first.report.cached == 0
    second = check.scan(str(data), skip_unknown_classes=True, cache_path=cache)
    assert second.report.decoded == 0 and second.report.cached == 39
    assert second.report.to_dict()["splits"] == first.report.to_dict()["splits"]
    assert all(check.CACHE_NAME not in path for path, _ in second.report.ignored)
    # A good file replaced by a cut copy (new size), and one rewritten with a new mtime only.
    victim = data / "train" / ANNA / "img_0.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    touched = data / "train" / ANNA / "img_1.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = check.scan(str(data), skip_unknown_classes=True, cache_path=cache)
    assert third.report.decoded == 2
    assert dict(third.report.bad_files)[f"train/{ANNA}/img_0.jpg"].startswith("truncated JPEG")


def test_trainer_read_inputs_refuses_an_unknown_valid_class_by_name(messy_dir, tmp_path):
    from trainer import flags as trainer_flags
    from trainer.errors import TrainingError
    from trainer.loop.inputs import read_inputs
    model_dir = tmp_path / "run"
    config = trainer_flags.config_from_argv([f"--data_dir={messy_dir}",
                                             f"--model_dir={model_dir}"])
    with pytest.raises(TrainingError) as error:
        read_inputs(config, print)
    assert str(error.value).startswith(f"split 'valid' has class folder(s) not in train: "
                                       f"{EXTRA_VALID_CLASS!r} (labels come from train; pass "
                                       f"--skip_unknown_classes")
    assert "\n" not in str(error.value)
    assert EXTRA_VALID_CLASS in (model_dir / "data_report.txt").read_text()


# ============================================================================================
# Command line and trainer (real processes)
# ============================================================================================
def test_check_command_prints_the_report_and_fails_on_the_unknown_class(messy_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(messy_dir, data)
    result = subprocess.run(["./run.sh", "check", f"--data_dir={data}",
                             f"--json={tmp_path / 'report.json'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "train: 4 classes, 25 readable images; per class min 4" in out
    assert "image sizes (width x height): 32x32 (24), 50x37 (1)" in out
    assert f"class folders not in train: {EXTRA_VALID_CLASS!r}" in out
    assert f"class folder {PARAKETT_VALID!r} is train class {PARAKETT_TRAIN!r}" in out
    for path, reason in BAD.items():
        assert f"{path}: " in out and reason in out
    assert "Traceback" not in result.stderr
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["splits"]["valid"]["classes_not_in_train"] == [EXTRA_VALID_CLASS]
    assert (data / ".check_cache.json").exists()


def test_trainer_trains_on_the_readable_files_and_writes_the_report(messy_dir, tmp_path):
    model_dir = tmp_path / "run"
    result = run_trainer(f"--data_dir={messy_dir}", f"--model_dir={model_dir}",
                         "--model=small_resnet", "--image_size=32", "--train_steps=4",
                         "--steps_per_loop=2", "--batch_size=8",
                         "--distribution_strategy=one_device", "--skip_unknown_classes")
    assert json.loads((model_dir / "classes.json").read_text()) == TRAIN_CLASSES
    assert f"taken as train class {PARAKETT_TRAIN!r}" in result.stdout
    assert "6 bad image file(s) left out" in result.stdout
    report = json.loads((model_dir / "data_report.json").read_text())
    assert {b["path"] for s in report["splits"].values() for b in s["bad_files"]} == set(BAD)
    assert "errors: none" in (model_dir / "data_report.txt").read_text()
    results = json.loads((model_dir / "results.json").read_text())
    assert results["steps"] == 4
    assert results["splits"]["valid"]["images"] == 6  # ZEBRA DOVE and the error page left out


def test_on_bad_file_fail_stops_before_training_with_the_list(messy_dir, tmp_path):
    model_dir = tmp_path / "run"
    result = run_trainer(f"--data_dir={messy_dir}", f"--model_dir={model_dir}",
                         "--model=small_resnet", "--image_size=32", "--train_steps=4",
                         "--batch_size=8", "--distribution_strategy=one_device",
                         "--skip_unknown_classes", "--on_bad_file=fail", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trainer: --on_bad_file=fail: 6 bad image file(s): ")
    assert f"'train/{PARAKETT_TRAIN}/empty.jpg': empty file (0 bytes)" in lines[0]
    assert str(model_dir / "data_report.txt") in lines[0]
    assert (model_dir / "data_report.txt").exists()
    assert not (model_dir / "checkpoints").exists() and not (model_dir / "config.json").exists()
