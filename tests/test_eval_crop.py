"""--eval_crop=F (issue 17, evaluation policy): the one evaluation decoder
(data.decode.decode_for_eval) reads the right pixels, folder and packed data give the same ones,
and the export's serving signature and trainer.evaluate use the run's policy.

Real TensorFlow on real PNG files; no training run (a freshly initialised model is enough to
compare pixels paths). The trained end-to-end case (--eval_crop=0.875 through the trainer's
evaluations, calibration, export and TFLite) is the calibrated run of tests/test_research.py.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data import decode
from tests.conftest import REPO

SIZE = 32


def _png(array: np.ndarray) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _gradient(height: int, width: int) -> np.ndarray:
    """R grows with x, G with y, B with x + y: every pixel's value says where it is."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                     (x + y) * 255 // (width + height - 2)], -1).astype(np.uint8)


def _pil_centre_crop(array: np.ndarray, size: int, fraction: float) -> np.ndarray:
    """The convention computed independently with PIL: short side floor(size / F), long side
    in proportion, then the centre size x size."""
    from PIL import Image
    height, width = array.shape[:2]
    short = int(np.floor(size / fraction))
    if height <= width:
        new_height, new_width = short, short * width // height
    else:
        new_height, new_width = short * height // width, short
    resized = np.asarray(Image.fromarray(array).resize((new_width, new_height),
                                                       Image.Resampling.BILINEAR))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top:top + size, left:left + size]


# --- the decoder ---------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("fraction", [0.5, 0.875])
@pytest.mark.parametrize("shape", [(100, 160), (160, 100)], ids=["wide", "tall"])
def test_centre_crop_reads_the_right_pixels(shape, fraction):
    image = _gradient(*shape)
    out = decode.decode_for_eval(tf.constant(_png(image)), SIZE, fraction).numpy()
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    expected = _pil_centre_crop(image, SIZE, fraction)
    # PIL's antialiased bilinear and TensorFlow's agree within one level; a crop one pixel
    # off-centre is 2-9 levels away in R or G (the gradients' steps per output pixel).
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    # The output centre is the image centre: R and G there are mid-range.
    centre = out[SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1].astype(int)
    assert np.all(np.abs(centre[..., :2] - 127) <= 10), centre[..., :2]


@pytest.mark.quick
def test_the_borders_are_cut_off_and_f1_is_todays_squash_bit_for_bit(demo_dir):
    # Bands: red for x < 30, blue for x >= 130, green between, 160 x 100.
    image = np.zeros([100, 160, 3], np.uint8)
    image[:, :30, 0] = 255
    image[:, 30:130, 1] = 255
    image[:, 130:, 2] = 255
    data = tf.constant(_png(image))
    squashed = decode.decode_for_eval(data, SIZE, 1.0).numpy()
    np.testing.assert_array_equal(squashed, decode.decode_and_resize(data, SIZE).numpy())
    assert squashed[:, 0, 0].min() == 255 and squashed[:, -1, 2].min() == 255  # both borders
    # 0.875: short side 36, long side 57, columns 12..43 of 57 = source x 33.7..123.5: no red,
    # no blue, all green.
    cropped = decode.decode_for_eval(data, SIZE, 0.875).numpy()
    assert cropped[..., 0].max() == 0 and cropped[..., 2].max() == 0
    assert cropped[..., 1].min() == 255
    # Square JPEGs (the demo set) and the read_ variant: F=1 is the squash, bit for bit.
    for path in sorted((demo_dir / "valid").rglob("*.jpg"))[:5]:
        np.testing.assert_array_equal(
            decode.read_for_eval(tf.constant(str(path)), SIZE, 1.0).numpy(),
            decode.read_and_resize(tf.constant(str(path)), SIZE).numpy())
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        decode.decode_for_eval(data, SIZE, 0.0)


# --- folder and packed data ------------------------------------------------------------------------
CLASSES = ("alpha", "beta")
SHAPES = [(60, 90), (90, 60), (70, 70), (48, 120)]


@pytest.fixture(scope="module")
def rect_dir(tmp_path_factory):
    """train/valid of two classes, four non-square-ish PNGs each (random pixels, seeded)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("rect") / "data"
    rng = np.random.default_rng(17)
    for split in ("train", "valid"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, shape in enumerate(SHAPES):
                pixels = rng.integers(0, 256, [*shape, 3], dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _images(dataset) -> np.ndarray:
    rows = [images.numpy()[weights.numpy() > 0] for images, _, weights in dataset]
    return np.concatenate(rows)


@pytest.mark.quick
def test_folder_and_packed_eval_datasets_give_the_same_cropped_pixels(rect_dir, tmp_path):
    from data import check, datasets, pack, source
    from data.spec import InputSpec
    split = check.scan(str(rect_dir)).splits["valid"]
    pack.pack(str(rect_dir), str(tmp_path / "packed"), shard_mb=0.01, log=lambda m: None)
    packed = source.open_source(str(tmp_path / "packed"))
    assert packed.kind == "packed"
    packed_split = packed.manifest.splits["valid"]
    assert [str(rect_dir / f) for f in packed_split.files] == list(split.files)
    squash = InputSpec(SIZE, 3, eval_cache="none")
    crop = dataclasses.replace(squash, eval_crop=0.875)
    folder = _images(datasets.eval_dataset(split.files, split.labels, crop))
    from_packed = _images(packed.eval_dataset(packed_split, crop))
    assert folder.shape == (len(split), SIZE, SIZE, 3)
    np.testing.assert_array_equal(from_packed, folder)
    expected = np.stack([decode.read_for_eval(tf.constant(f), SIZE, 0.875).numpy()
                         for f in split.files])
    np.testing.assert_array_equal(folder, expected)
    squashed = _images(datasets.eval_dataset(split.files, split.labels, squash))
    assert not np.array_equal(squashed, folder)
    np.testing.assert_array_equal(_images(packed.eval_dataset(packed_split, squash)), squashed)


# --- the export and trainer.evaluate -------------------------------------------------------------
def _model(num_classes: int = 5):
    import keras

    from models import registry
    keras.utils.set_random_seed(3)
    return registry.build("small_resnet", num_classes, SIZE)


@pytest.mark.quick
def test_the_serving_signature_decodes_with_the_runs_eval_crop(rect_dir, tmp_path):
    from data import datasets
    from data.spec import InputSpec
    from trainer.tools import calibration, serving
    files = sorted(str(p) for p in (rect_dir / "valid").rglob("*.png"))
    model = _model()
    path = serving.export(model, list("abcde"), SIZE, str(tmp_path), 1, eval_crop=0.5)
    assert json.loads((tmp_path / "1" / serving.PREPROCESSING_FILE).read_text())["short_side"] \
        == 64
    served = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant([open(f, "rb").read() for f in files]))
    probabilities = np.zeros([len(files), 5], np.float32)
    np.put_along_axis(probabilities, served["class_ids"].numpy(),
                      served["probabilities"].numpy(), 1)

    def expected(fraction):
        pixels = _images(datasets.eval_dataset(files, [0] * len(files),
                                               InputSpec(SIZE, 4, eval_crop=fraction)))
        return calibration.softmax(model(pixels.astype(np.float32), training=False).numpy())
    np.testing.assert_allclose(probabilities, expected(0.5), atol=1e-5)
    assert np.abs(probabilities - expected(1.0)).max() > 1e-4  # the crop matters
    # The TFLite input helper is the same decoder.
    np.testing.assert_array_equal(
        serving.tflite_pixels([open(f, "rb").read() for f in files[:2]], SIZE, 0.5),
        np.stack([decode.read_for_eval(tf.constant(f), SIZE, 0.5).numpy() for f in files[:2]]))


@pytest.fixture(scope="module")
def cropped_run(rect_dir, tmp_path_factory):
    """A run folder as the trainer leaves it (config.json with --eval_crop=0.5, classes.json,
    a checkpoint at step 7) around a freshly initialised model: no training needed."""
    from trainer.config import Config
    model_dir = tmp_path_factory.mktemp("cropped") / "run"
    model_dir.mkdir()
    config = Config(data_dir=str(rect_dir), model_dir=str(model_dir), model="small_resnet",
                    image_size=SIZE, batch_size=4, eval_crop=0.5)
    (model_dir / "config.json").write_text(config.to_json())
    (model_dir / "classes.json").write_text(json.dumps(list(CLASSES)))
    model = _model(len(CLASSES))
    checkpoint = tf.train.Checkpoint(model=model, step=tf.Variable(7, dtype=tf.int64))
    tf.train.CheckpointManager(checkpoint, str(model_dir / "checkpoints"), 1).save()
    return model_dir, model


def _evaluate(model_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.evaluate", f"--model_dir={model_dir}",
                           "--split=valid", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180)


def test_evaluate_uses_the_runs_eval_crop_and_an_override_gets_its_own_files(cropped_run,
                                                                           rect_dir, tmp_path):
    from data import datasets
    from data.spec import InputSpec
    from trainer.tools import calibration
    model_dir, model = cropped_run
    run_own = _evaluate(model_dir, f"--output_dir={tmp_path}")
    assert run_own.returncode == 0, run_own.stderr[-2000:]
    assert "eval pixels centre crop 0.5 (--eval_crop=0.5)" in run_own.stdout
    override = _evaluate(model_dir, f"--output_dir={tmp_path}", "--eval_crop=1")
    assert override.returncode == 0, override.stderr[-2000:]
    assert "eval pixels squashed (--eval_crop=1, not the run's 0.5)" in override.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "valid-step7-confusion.csv", "valid-step7-crop1-confusion.csv",
        "valid-step7-crop1-predictions.csv", "valid-step7-crop1.json",
        "valid-step7-predictions.csv", "valid-step7.json"]
    for name, fraction in (("valid-step7", 0.5), ("valid-step7-crop1", 1.0)):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert (report["eval_crop"], report["run_eval_crop"]) == (fraction, 0.5)
        with open(tmp_path / f"{name}-predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        pixels = _images(datasets.eval_dataset([r["file"] for r in rows], [0] * len(rows),
                                               InputSpec(SIZE, 4, eval_crop=fraction)))
        expected = calibration.softmax(model(pixels.astype(np.float32), training=False).numpy())
        np.testing.assert_allclose([float(r["probability"]) for r in rows], expected.max(1),
                                   atol=1e-5)
    bad = _evaluate(model_dir, "--eval_crop=0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--eval_crop" in bad.stderr
