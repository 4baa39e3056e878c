"""Evaluate, export and predict: from a checkpoint to a model that serves.

One short demo run is trained per session (one device, 60 steps, valid every 20) and reused.
The tools run as real processes; the exported SavedModel is loaded in a fresh Python that
imports TensorFlow only.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST_DEMO_FLAGS, REPO, run_trainer

TRAIN_STEPS = 60
AGREEMENT = 0.995  # share of images whose top-1 must agree
ACCURACY_POINTS = 0.005


def run_tool(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", f"trainer.{tool}", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def trained(demo_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("evalrun") / "run"
    result = run_trainer(f"--data_dir={demo_dir}", f"--model_dir={model_dir}", *FAST_DEMO_FLAGS,
                         f"--train_steps={TRAIN_STEPS}", "--eval_every_steps=20",
                         "--distribution_strategy=one_device",
                         # No test reads the trainer's figures or high-loss gallery (the
                         # TensorBoard figures checked here are the evaluate tool's); the
                         # export is read.
                         "--export_at_end")
    results = json.loads((model_dir / "results.json").read_text())
    return model_dir, result.stdout, results


@pytest.fixture(scope="module")
def test_evaluation(trained):
    """`trainer.evaluate` on the whole test split, latest checkpoint."""
    model_dir, _, _ = trained
    result = run_tool("evaluate", f"--model_dir={model_dir}", "--split=test")
    report = json.loads((model_dir / "evaluation" / f"test-step{TRAIN_STEPS}.json").read_text())
    rows = read_csv(model_dir / "evaluation" / f"test-step{TRAIN_STEPS}-predictions.csv")
    return report, rows, result.stdout


def _class_of(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


# --- best checkpoint ----------------------------------------------------------------------------
def test_training_keeps_and_reports_the_best_checkpoint(trained):
    model_dir, stdout, results = trained
    lines = stdout.splitlines()
    valid_accuracies = {}  # step -> valid accuracy, from the console
    step = None
    for line in lines:
        match = re.match(r"epoch \d+ step (\d+)/", line)
        if match:
            step = int(match.group(1))
        match = re.match(r"\s+valid loss \S+ acc (\S+)", line)
        if match:
            valid_accuracies[step] = float(match.group(1))
            following = lines[lines.index(line) + 1]
            assert re.fullmatch(r"  best checkpoint: step \d+ \(valid acc \d\.\d{4}\)", following)
    final = re.search(r"final valid: loss \S+ acc (\S+)", stdout)
    valid_accuracies[TRAIN_STEPS] = float(final.group(1))
    assert sorted(valid_accuracies) == [20, 40, 60]
    best_step = max(valid_accuracies, key=lambda s: (valid_accuracies[s], -s))  # ties: earlier
    state = json.loads((model_dir / "checkpoints" / "best" / "best.json").read_text())
    assert state["step"] == best_step, (state, valid_accuracies)
    assert round(state["valid_accuracy"], 4) == valid_accuracies[best_step]
    assert f"best checkpoint: step {best_step} (valid acc {valid_accuracies[best_step]:.4f})" \
        in stdout
    assert results["best_checkpoint"]["step"] == best_step
    assert results["best_checkpoint"]["path"] == str(model_dir / "checkpoints" / "best" /
                                                     f"ckpt-{best_step}")
    # Only the best checkpoint's files remain beside best.json.
    names = sorted(os.listdir(model_dir / "checkpoints" / "best"))
    assert names == ["best.json", f"ckpt-{best_step}.data-00000-of-00001",
                     f"ckpt-{best_step}.index"]


@pytest.mark.quick
def test_best_checkpoint_update_saves_only_improvements_and_survives_a_restart(tmp_path):
    import keras
    import tensorflow as tf

    from trainer.state.checkpoints import BestCheckpoint
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=model, step=step)
    best = BestCheckpoint(str(tmp_path / "best"), checkpoint)
    assert best.summary() is None
    assert best.update(10, 0.5)
    assert not best.update(20, 0.5)  # a tie keeps the earlier step
    model.layers[0].kernel.assign(tf.ones([3, 2]))
    step.assign(30)
    assert best.update(30, 0.75)
    assert not best.update(40, 0.6)
    assert sorted(os.listdir(tmp_path / "best")) == [
        "best.json", "ckpt-30.data-00000-of-00001", "ckpt-30.index"]
    # A resumed run starts from the record: 0.7 is no improvement, 0.8 is.
    again = BestCheckpoint(str(tmp_path / "best"), checkpoint)
    assert again.describe() == "best checkpoint: step 30 (valid acc 0.7500)"
    assert not again.update(50, 0.7)
    # The saved weights are those of step 30.
    model.layers[0].kernel.assign(tf.zeros([3, 2]))
    tf.train.Checkpoint(model=model, step=step).restore(again.summary()["path"])
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), np.ones([3, 2]))
    assert int(step.numpy()) == 30


# --- evaluate -----------------------------------------------------------------------------------
def test_evaluate_matches_the_trainer_and_writes_figures(trained, test_evaluation):
    model_dir, _, results = trained
    report, rows, stdout = test_evaluation
    trainer_test = results["splits"]["test"]
    assert report["images"] == trainer_test["images"] == 270 == len(rows)
    assert report["accuracy"] == pytest.approx(trainer_test["accuracy"], abs=1e-6)
    assert report["top5_accuracy"] == pytest.approx(trainer_test["top5_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(trainer_test["loss"], rel=1e-4)
    assert report["checkpoint"].startswith(str(model_dir / "checkpoints" / "ckpt-"))
    assert f"top-1 {report['accuracy']:.4f}" in stdout
    assert np.mean([r["correct"] == "1" for r in rows]) == pytest.approx(report["accuracy"])
    assert all(r["true"] == _class_of(r["file"]) for r in rows)

    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(
        str(model_dir / "eval"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"test/confusion_matrix", "test/per_class"} <= tags
    confusion_png = tf.make_ndarray(events.Tensors("test/confusion_matrix")[-1].tensor_proto)[2]
    assert tf.io.decode_png(confusion_png).shape[0] >= 400
    wrong = sum(r["correct"] == "0" for r in rows)
    assert ("test/misclassified" in tags) == (wrong > 0)
    assert events.Tensors("test/confusion_matrix")[-1].step == TRAIN_STEPS


@pytest.fixture(scope="module")
def best_on_37(trained, demo_dir, tmp_path_factory):
    """A test split of 37 images (9 of the 10 classes: 5x5 + 4x3), evaluated from the best
    checkpoint with batches of 16 (so 11 padding images)."""
    model_dir, _, _ = trained
    root = tmp_path_factory.mktemp("subset")
    classes = sorted(os.listdir(demo_dir / "test"))[:9]
    copied = {}
    for i, name in enumerate(classes):
        (root / "test" / name).mkdir(parents=True)
        files = sorted(os.listdir(demo_dir / "test" / name))[:5 if i < 5 else 3]
        for f in files:
            shutil.copy(demo_dir / "test" / name / f, root / "test" / name / f)
        copied[name] = len(files)
    assert sum(copied.values()) == 37
    out = root / "out"
    result = run_tool("evaluate", f"--model_dir={model_dir}", f"--data_dir={root}",
                      "--split=test", "--checkpoint=best", "--batch_size=16",
                      f"--output_dir={out}")
    best_step = json.loads((model_dir / "checkpoints" / "best" / "best.json").read_text())["step"]
    return out, best_step, copied, result.stdout


def test_evaluate_counts_37_images_once_and_per_class_numbers_agree(trained, best_on_37):
    _, _, results = trained
    out, best_step, copied, stdout = best_on_37
    report = json.loads((out / f"test-step{best_step}.json").read_text())
    assert report["images"] == 37
    assert f"(step {best_step}) on test: 37 images" in stdout
    with open(out / f"test-step{best_step}-confusion.csv", newline="") as f:
        table = list(csv.reader(f))
    class_names = table[0][1:]
    assert class_names == json.loads((trained[0] / "classes.json").read_text())
    assert [row[0] for row in table[1:]] == class_names
    confusion = np.array([[int(x) for x in row[1:]] for row in table[1:]])
    assert confusion.sum() == 37
    predictions = read_csv(out / f"test-step{best_step}-predictions.csv")
    assert len(predictions) == len({r["file"] for r in predictions}) == 37
    index = {name: i for i, name in enumerate(class_names)}
    recount = np.zeros_like(confusion)
    for r in predictions:
        recount[index[r["true"]], index[r["predicted"]]] += 1
    np.testing.assert_array_equal(recount, confusion)
    assert report["accuracy"] == pytest.approx(np.trace(confusion) / 37)
    for i, row in enumerate(report["per_class"]):
        assert row["class"] == class_names[i]
        assert row["support"] == confusion[i].sum() == copied.get(row["class"], 0)
        assert row["predicted"] == confusion[:, i].sum()
        assert row["correct"] == confusion[i, i]
        if row["support"]:
            assert row["recall"] == pytest.approx(confusion[i, i] / confusion[i].sum())
        else:
            assert row["recall"] is None  # the class left out of this split
        if row["predicted"]:
            assert row["precision"] == pytest.approx(confusion[i, i] / confusion[:, i].sum())
        else:
            assert row["precision"] is None
    assert report["step"] == best_step
    assert report["checkpoint"].endswith(f"best/ckpt-{best_step}")


# --- export -------------------------------------------------------------------------------------
ISOLATED_SCRIPT = r"""
import importlib.util, json, sys
site_packages, export_dir, files_path, repo = sys.argv[1:5]
sys.path.append(site_packages)  # site-packages only: no .pth files, so no editable install
assert importlib.util.find_spec("trainer") is None, "the project is importable"
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
files = json.load(open(files_path))
top1, k = [], None
for start in range(0, len(files), 64):
    contents = [open(f, "rb").read() for f in files[start:start + 64]]
    out = serve(images=tf.constant(contents))
    k = int(out["classes"].shape[1])
    assert (np.diff(out["probabilities"].numpy(), axis=1) <= 0).all()
    top1 += [name.decode() for name in out["classes"][:, 0].numpy()]
project = tuple(f"{repo}/{package}/" for package in ("trainer", "data", "models", "tests"))
ours = [m for m, mod in list(sys.modules.items())
        if str(getattr(mod, "__file__", None)).startswith(project)]
print(json.dumps({"top1": top1, "k": k, "project_modules": ours}))
"""


def test_saved_model_in_a_tensorflow_only_process_agrees_with_evaluation(
        trained, test_evaluation, tmp_path):
    model_dir, stdout, results = trained
    report, rows, _ = test_evaluation
    export_dir = Path(results["export_dir"])
    assert export_dir == model_dir / "export" / str(TRAIN_STEPS)
    assert f"exported for serving: {export_dir}" in stdout
    assert (export_dir / "saved_model.pb").exists() and (export_dir / "variables").is_dir()
    assert os.listdir(model_dir / "export") == [str(TRAIN_STEPS)]  # no temporary leftovers
    files = [r["file"] for r in rows]
    (tmp_path / "files.json").write_text(json.dumps(files))
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ISOLATED_SCRIPT, sysconfig.get_paths()["purelib"],
         str(export_dir), str(tmp_path / "files.json"), str(REPO)],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["project_modules"] == []
    assert served["k"] == 5
    agree = np.mean([s == r["predicted"] for s, r in zip(served["top1"], rows)])
    served_accuracy = np.mean([s == _class_of(f) for s, f in zip(served["top1"], files)])
    print(f"SavedModel vs trainer.evaluate top-1 agreement {agree:.4f}; accuracy served "
          f"{served_accuracy:.4f}, trainer {results['splits']['test']['accuracy']:.4f}")
    assert agree >= AGREEMENT
    assert abs(served_accuracy - results["splits"]["test"]["accuracy"]) <= ACCURACY_POINTS
    assert abs(served_accuracy - report["accuracy"]) <= ACCURACY_POINTS


def test_keras_files_load_and_predict_the_same(trained, test_evaluation):
    import keras
    import tensorflow as tf

    import models.batchnorm  # noqa: F401  (registers the fused BatchNorm layer, as the README says)
    from data import decode
    model_dir, _, results = trained
    _, rows, _ = test_evaluation
    class_names = json.loads((model_dir / "classes.json").read_text())
    images = np.stack([decode.decode_and_resize(tf.io.read_file(r["file"]), 32).numpy()
                       for r in rows])
    logits = {}
    for path in (Path(results["export_dir"]) / "model.keras", model_dir / "model.keras"):
        model = keras.models.load_model(path)
        logits[path] = model.predict(images, batch_size=64, verbose=0)
        predicted = [class_names[i] for i in np.argmax(logits[path], axis=1)]
        agree = np.mean([p == r["predicted"] for p, r in zip(predicted, rows)])
        assert agree >= AGREEMENT, (path, agree)
    first, second = logits.values()
    np.testing.assert_allclose(first, second, rtol=1e-4, atol=1e-4)


def test_export_tool_writes_a_new_version_from_the_best_checkpoint(trained, best_on_37, tmp_path):
    import tensorflow as tf
    model_dir, _, _ = trained
    out, best_step, _, _ = best_on_37
    root = tmp_path / "exports"
    # --temperature=1: the evaluation's probabilities below are the uncalibrated softmax.
    result = run_tool("export", f"--model_dir={model_dir}", "--checkpoint=best",
                      f"--export_root={root}", "--version=3", "--top_k=3", "--temperature=1")
    assert f"(step {best_step}) to {root / '3'}" in result.stdout
    assert sorted(os.listdir(root)) == ["3"]
    serve = tf.saved_model.load(str(root / "3")).signatures["serving_default"]
    rows = read_csv(out / f"test-step{best_step}-predictions.csv")
    out_ = serve(images=tf.constant([open(r["file"], "rb").read() for r in rows]))
    assert out_["classes"].shape == (37, 3)
    served = [c.decode() for c in out_["classes"][:, 0].numpy()]
    assert np.mean([s == r["predicted"] for s, r in zip(served, rows)]) >= AGREEMENT
    np.testing.assert_allclose(out_["probabilities"][:, 0].numpy(),
                               [float(r["probability"]) for r in rows], atol=1e-4)
    # A version is never overwritten by accident.
    again = run_tool("export", f"--model_dir={model_dir}", f"--export_root={root}",
                     "--version=3", check=False)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"export: {root / '3'} already exists (versions are never overwritten; pass "
        f"--overwrite or another --version)"]


# --- predict ------------------------------------------------------------------------------------
def test_predict_reports_a_bad_file_and_predicts_the_others(trained, test_evaluation, tmp_path):
    from PIL import Image
    model_dir, _, _ = trained
    _, rows, _ = test_evaluation
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    chosen = rows[::60]  # 5 images of different classes
    expected = {}
    for i, r in enumerate(chosen):
        if i == 0:  # one as PNG, in a sub-folder
            target = folder / "more" / "as_png.png"
            Image.open(r["file"]).save(target)
        else:
            target = folder / f"{i}_{os.path.basename(r['file'])}"
            shutil.copy(r["file"], target)
        expected[str(target)] = r["predicted"]
    bad = folder / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    (folder / "notes.txt").write_text("ignored: not an image file name")

    result = run_tool("predict", f"--export_dir={model_dir / 'export'}", "--format=json",
                      folder, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"predict: {bad}: not a decodable image (JPEG, PNG, GIF or BMP)"]
    records = json.loads(result.stdout)
    assert {r["file"] for r in records} == set(expected)
    for record in records:
        top = record["predictions"]
        assert len(top) == 5
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top),
                                                         reverse=True)
        assert top[0]["class"] == expected[record["file"]]

    table = run_tool("predict", f"--export_dir={model_dir / 'export' / str(TRAIN_STEPS)}",
                     "--top_k=2", bad, *sorted(expected), check=False)
    assert table.returncode == 1
    lines = table.stdout.strip().splitlines()
    assert len(lines) == len(expected)
    for line, path in zip(lines, sorted(expected)):
        probability = r"[01]\.\d{4}"
        assert re.fullmatch(rf"{re.escape(path)}  {expected[path]} {probability}  \S+ "
                            rf"{probability}", line), line
    assert table.stderr.strip().splitlines() == [
        f"predict: {bad}: not a decodable image (JPEG, PNG, GIF or BMP)"]


def test_tool_user_errors_are_one_line(trained, tmp_path):
    model_dir, _, _ = trained
    cases = [
        ("evaluate", [f"--model_dir={tmp_path / 'nowhere'}"],
         f"evaluate: --model_dir={tmp_path / 'nowhere'}: no such directory"),
        ("evaluate", [f"--model_dir={model_dir}", "--split=tset"],
         "evaluate: --split=tset: "),
        ("evaluate", [f"--model_dir={model_dir}", "--checkpoint=nope"],
         "evaluate: --checkpoint=nope: not latest, best,"),
        ("export", [f"--model_dir={model_dir}", "--version=v1"],
         "export: flag error: flag --version=v1: --version must be"),
        ("predict", [f"--export_dir={tmp_path}", str(tmp_path)],
         f"predict: --export_dir={tmp_path}: neither a SavedModel"),
    ]
    for tool, args, start in cases:
        result = run_tool(tool, *args, check=False)
        assert result.returncode in (1, 2), (tool, args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (tool, args, result.stderr)
