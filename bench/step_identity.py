"""Are this checkout's training numbers bit-identical to another checkout's?

    python -m bench.step_identity --reference=/path/to/a/checkout/of/main [--cases=a,b]

Runs the trainer of both checkouts (each in its own process, with its own code first on
PYTHONPATH, the same Python) with the same tiny flags on the same small dataset, and compares
byte for byte every checkpoint's variables (weights, optimizer slots, weight averages, counters)
and step_losses.tsv (and batch_ids.tsv). Cases (all --deterministic, small_resnet at 32 px,
a few steps):
  demo      configs/demo.cfg (two replicas) in float32
  recipes   two replicas with every recipe on: label smoothing, balanced class weights (the
            dataset's classes are unbalanced), 2 micro-batches, clipping, EMA, the gradient norm,
            the batches' image ids (--debug_record_batches)
  float16   the recipes in float16 (loss scaling, the overflow agreement) with a NaN batch
            rolled back (--debug_nan_batches, --on_nan=rollback)
Prints one line per case and exits 1 when any differs. Takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TINY = ("--model=small_resnet", "--image_size=32", "--batch_size=32", "--steps_per_loop=3",
        "--train_steps=9", "--checkpoint_every_steps=3", "--keep_checkpoints=5",
        "--deterministic", "--noeval_figures", "--noexport_at_end", "--high_loss_scan=0")
TWO_REPLICAS = ("--distribution_strategy=mirrored", "--cpu_devices=2")
RECIPES = ("--label_smoothing=0.1", "--class_weight=balanced", "--grad_accum_steps=2",
           "--clip_grad_norm=0.5", "--ema_decay=0.9", "--summary_histograms")
CASES = {
    "demo": ("--flagfile=configs/demo.cfg", *TINY, "--mixed_precision=none"),
    "recipes": (*TINY, *TWO_REPLICAS, *RECIPES, "--mixed_precision=none", "--base_lr=0.01",
                "--debug_record_batches"),
    "float16": (*TINY, *TWO_REPLICAS, *RECIPES, "--mixed_precision=float16", "--base_lr=0.01",
                "--debug_nan_batches=4", "--on_nan=rollback"),
}


def build_dataset(dest: Path) -> None:
    """The demo digits with class i cut to 12 + 4 i train images (unbalanced, so the balanced
    class weights differ) and 4 valid and test images per class."""
    from data import demo
    full = dest.parent / "full"
    demo.build(str(full))
    for split in ("train", "valid", "test"):
        for i, class_dir in enumerate(sorted((full / split).iterdir())):
            count = 12 + 4 * i if split == "train" else 4
            (dest / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, dest / split / class_dir.name / image.name)
    shutil.rmtree(full)


def train(checkout: Path, flags: tuple[str, ...], data_dir: Path, model_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(checkout), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "trainer.main", *flags,
                             f"--data_dir={data_dir}", f"--model_dir={model_dir}"],
                            cwd=checkout, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"step_identity: the trainer of {checkout} exited "
                         f"{result.returncode}:\n{result.stderr[-3000:]}")


def checkpoint_variables(model_dir: Path) -> dict[str, dict[str, bytes]]:
    """{checkpoint file name: {variable: its bytes}} of every checkpoint kept."""
    import numpy as np
    import tensorflow as tf
    state = tf.train.get_checkpoint_state(str(model_dir / "checkpoints"))
    out = {}
    for path in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        out[os.path.basename(path)] = {
            name: np.asarray(reader.get_tensor(name)).tobytes()
            for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}
    return out


def differences(mine: Path, theirs: Path) -> list[str]:
    """What differs between two run folders (empty: bit-identical)."""
    found = []
    for table in ("step_losses.tsv", "batch_ids.tsv"):  # (batch ids: --debug_record_batches)
        contents = {(d / table).read_bytes() if (d / table).exists() else None
                    for d in (mine, theirs)}
        if len(contents) > 1:
            found.append(table)
    a, b = checkpoint_variables(mine), checkpoint_variables(theirs)
    if sorted(a) != sorted(b):
        found.append(f"checkpoints {sorted(a)} against {sorted(b)}")
    for name in sorted(set(a) & set(b)):
        changed = sorted(v for v in set(a[name]) | set(b[name])
                         if a[name].get(v) != b[name].get(v))
        if changed:
            found.append(f"{name}: {len(changed)} variables, e.g. {changed[0]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path,
                        help="a checkout of the code to compare with (e.g. main)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " +
                        ", ".join(CASES))
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    if not (args.reference / "trainer" / "main.py").is_file():
        parser.error(f"--reference={args.reference}: no trainer/main.py there")
    failed = False
    with tempfile.TemporaryDirectory(prefix="step_identity.") as scratch:
        data_dir = Path(scratch) / "data" / "demo"
        build_dataset(data_dir)
        for case in cases:
            runs = {}
            for label, checkout in (("this", HERE), ("reference", args.reference.resolve())):
                runs[label] = Path(scratch) / case / label
                train(checkout, CASES[case], data_dir, runs[label])
            found = differences(runs["this"], runs["reference"])
            failed |= bool(found)
            print(f"{case}: " + ("bit-identical (step losses, batch ids, every checkpoint's "
                                 "variables)" if not found else "DIFFERS: " + "; ".join(found)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
