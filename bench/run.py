"""The speed benchmark: the trainer against Keras `fit` and against the hardware's ceiling.

    python -m bench.run [--image_size=96] [--batch_size=32] [--replicas=2] [--steps=30]
    ./run.sh bench ...

Every row runs in its own process on the same bird-layout JPEG data (built offline from
scikit-learn's sample photographs by data/photos.py), the same model, image size, global batch
and replica count, and reports steady-state images/sec (the first `--warmup_steps` excluded and
their time reported apart):

  a  trainer               python -m trainer.main on the JPEG folders (fused BatchNorm,
                           --mixed_precision as given here: none by default)
  a2 trainer, auto         the same with --mixed_precision=auto (bfloat16 where the hardware
                           runs it natively)
  a3 trainer, stock BN     the same as a with --nofused_batchnorm (Keras 3's own layer)
  a4 trainer, --xla        the same as a with --xla (forward and backward compiled by XLA)
  b  reference fit         image_dataset_from_directory(...).prefetch(2).cache().shuffle(1000),
                           the model compiled under MirroredStrategy, model.fit with Keras
                           defaults (for resnet50, keras.applications.ResNet50 as the reference
                           builds it; other models with Keras' stock BatchNorm)
  c  tuned fit             model.fit with jit_compile=False on this project's tf.data pipeline
                           (the registry's model with Keras' stock BatchNorm)
  d  trainer, synthetic    the trainer on in-memory random images: this model's compute ceiling
  d2 trainer, synth., auto the same with --mixed_precision=auto
  g  tf_keras ResNet50     tf_keras.applications.ResNet50 (FusedBatchNormV3, as Keras 2 had it)
                           on the same step (strategy.run of a GradientTape step, Adam, steps in
                           one tf.function) on random images; float32, and g2 in the auto
                           precision. Needs the `tf-keras` package (the `bench` extra); the row
                           says so and is skipped without it
  e  input pipeline        decoded, augmented, batched images/sec, no model
  f  matmul                a 4096^3 matmul in float32 and bfloat16: the hardware's ceiling

MFU = training FLOPs per image (3x the forward FLOPs that TensorFlow's profiler counts on the
model graph) x images/sec / the matmul ceiling (row f) in the row's compute dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import OneLineErrorParser, TrainerFailed, input_rows, run_trainer

ROWS = ("trainer", "trainer_auto", "trainer_stock", "trainer_xla", "reference_fit", "tuned_fit", "synthetic",
        "synthetic_auto", "tf_keras", "tf_keras_auto", "input", "matmul")
DEFAULT_ROWS = ("trainer", "trainer_auto", "reference_fit", "tuned_fit", "synthetic",
                "tf_keras", "tf_keras_auto", "input", "matmul")
# Trainer rows: (synthetic data, --mixed_precision (None: the bench's), --fused_batchnorm,
# --xla).
TRAINER_ROWS = {"trainer": (False, None, True, False),
                "trainer_auto": (False, "auto", True, False),
                "trainer_stock": (False, None, False, False),
                "trainer_xla": (False, None, True, True),
                "synthetic": (True, None, True, False),
                "synthetic_auto": (True, "auto", True, False)}
TF_KERAS_MISSING = "tf_keras is not installed (pip install 'tf-keras==2.21.*', the bench extra)"


# ============================================================================================
# Workers: each runs in a fresh process and prints one JSON line
# ============================================================================================
def _setup(replicas: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer.loop import distribute
    if replicas > 1:
        distribute.split_cpu(replicas)
        return distribute.make_strategy("mirrored", replicas)
    return distribute.make_strategy("mirrored", 0)


def _batch_timer():
    """A Keras callback that records the wall time of every training batch."""
    import keras

    class BatchTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.start = [], 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    return BatchTimer()


def _fit_result(timer, batch_size: int, warmup: int) -> dict:
    steady = timer.times[warmup:]
    return {"images_per_second": batch_size * len(steady) / sum(steady),
            "warmup_seconds": sum(timer.times[:warmup])}


def worker_reference_fit(args) -> dict:
    """The reference example's approach, on current Keras (learning_rate=, not lr=)."""
    strategy = _setup(args.replicas)
    import keras
    train = keras.utils.image_dataset_from_directory(
        os.path.join(args.data_dir, "train"), image_size=(args.image_size, args.image_size),
        batch_size=args.batch_size, label_mode="int")
    num_classes = len(train.class_names)
    train = train.prefetch(2).cache().shuffle(1000).repeat()
    with strategy.scope():
        if args.model == "resnet50":  # literally the reference's model
            model = keras.applications.ResNet50(weights=None, classes=num_classes,
                                                input_shape=(args.image_size, args.image_size, 3))
        else:  # the same model as every other row
            from models import registry
            model = registry.build(args.model, num_classes, args.image_size,
                                   fused_batchnorm=False)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = _batch_timer()
    model.fit(train, epochs=1, steps_per_epoch=args.warmup_steps + args.steps, verbose=0,
              callbacks=[timer])
    return _fit_result(timer, args.batch_size, args.warmup_steps)


def worker_tuned_fit(args) -> dict:
    """What a careful Keras user would do: jit off, parallel decode, uint8 cache, prefetch."""
    strategy = _setup(args.replicas)
    import keras
    from data import datasets, layout
    from data.spec import InputSpec
    from models import registry
    names = layout.train_class_names(args.data_dir)
    split = layout.scan_split(args.data_dir, "train", names)
    steps = args.warmup_steps + args.steps
    dataset = datasets.train_dataset(split.files, split.labels,
                                     InputSpec(args.image_size, args.batch_size),
                                     total_steps=steps)
    with strategy.scope():  # Keras' stock BatchNorm, as a Keras user has it
        model = registry.build(args.model, len(names), args.image_size, fused_batchnorm=False)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
    timer = _batch_timer()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return _fit_result(timer, args.batch_size, args.warmup_steps)


def worker_tf_keras(args, precision: str = "none") -> dict:
    """tf_keras' ResNet50 (FusedBatchNormV3 inside) on the trainer's kind of step, on random
    images: strategy.run of a GradientTape step with Adam, the steps in one tf.function."""
    if args.model != "resnet50":
        return {"skipped": "the tf_keras anchor is ResNet50 only"}
    try:
        import tf_keras
    except ImportError:
        return {"skipped": TF_KERAS_MISSING}
    strategy = _setup(args.replicas)
    import numpy as np
    import tensorflow as tf
    from trainer.loop.precision import resolve_precision
    chosen = resolve_precision(precision)
    if chosen.dtype == "float16":
        return {"skipped": "float16 (loss scaling) is not part of this anchor row"}
    tf_keras.mixed_precision.set_global_policy(chosen.policy)
    size, per_replica = args.image_size, args.batch_size // args.replicas
    with strategy.scope():
        inputs = tf_keras.Input((size, size, 3))
        base = tf_keras.applications.ResNet50(include_top=False, weights=None, pooling="avg",
                                              input_shape=(size, size, 3))
        logits = tf_keras.layers.Dense(8, dtype="float32")(base(inputs))
        model = tf_keras.Model(inputs, logits)
        optimizer = tf_keras.optimizers.Adam(learning_rate=1e-3)
    rng = np.random.default_rng(0)
    batch = (rng.uniform(0, 255, (per_replica, size, size, 3)).astype(np.float32),
             rng.integers(0, 8, per_replica).astype(np.int32))
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensors(batch).repeat()))

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, tf.cast(model(images, training=True), tf.float32))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=args.batch_size)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def loop(num_steps):
        total = tf.constant(0.0)
        for _ in tf.range(num_steps):
            total += strategy.reduce("SUM", strategy.run(replica_step, args=next(iterator)),
                                     axis=None)
        return total

    start = time.perf_counter()
    loop(tf.constant(args.warmup_steps)).numpy()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    loop(tf.constant(args.steps)).numpy()
    return {"images_per_second": args.steps * args.batch_size / (time.perf_counter() - start),
            "warmup_seconds": warmup, "compute_dtype": chosen.dtype}


def worker_input(args) -> dict:
    _setup(1)
    from data import datasets, layout
    from data.spec import InputSpec
    names = layout.train_class_names(args.data_dir)
    split = layout.scan_split(args.data_dir, "train", names)
    steps = args.warmup_steps + args.steps * 4
    dataset = datasets.train_dataset(split.files, split.labels,
                                     InputSpec(args.image_size, args.batch_size),
                                     total_steps=steps)
    iterator = iter(dataset)
    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        next(iterator)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    count = 0
    for images, _, _ in iterator:
        count += int(images.shape[0])
    return {"images_per_second": count / (time.perf_counter() - start), "warmup_seconds": warmup}


def worker_matmul(args) -> dict:
    _setup(1)
    from trainer.report import performance
    return {dtype: performance.matmul_flops_per_second(dtype, size=args.matmul_size)
            for dtype in ("float32", "bfloat16")}


def worker_flops(args) -> dict:
    _setup(1)
    from models import registry
    from trainer.report import performance
    model = registry.build(args.model, 8, args.image_size)
    return {"train_flops_per_image": performance.BACKWARD_FACTOR *
            performance.forward_flops_per_image(model, args.image_size)}


WORKERS = {"reference_fit": worker_reference_fit, "tuned_fit": worker_tuned_fit,
           "tf_keras": worker_tf_keras,
           "tf_keras_auto": lambda args: worker_tf_keras(args, "auto"),
           "input": worker_input, "matmul": worker_matmul, "flops": worker_flops}


# ============================================================================================
# The driver
# ============================================================================================
def _run_worker(name: str, args) -> dict:
    command = [sys.executable, "-m", "bench.run", f"--worker={name}"] + _common_flags(args)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bench worker {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _common_flags(args) -> list[str]:
    return [f"--data_dir={args.data_dir}", f"--image_size={args.image_size}",
            f"--batch_size={args.batch_size}", f"--replicas={args.replicas}",
            f"--steps={args.steps}", f"--warmup_steps={args.warmup_steps}",
            f"--model={args.model}", f"--mixed_precision={args.mixed_precision}",
            f"--matmul_size={args.matmul_size}"]


def _run_trainer(args, row: str, model_dir: str) -> dict:
    synthetic, precision, fused, xla = TRAINER_ROWS[row]
    flags = [f"--data_dir={args.data_dir}", f"--model={args.model}",
             f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
             f"--train_steps={args.warmup_steps + args.steps}",
             f"--steps_per_loop={args.warmup_steps}", "--distribution_strategy=mirrored",
             f"--cpu_devices={args.replicas if args.replicas > 1 else 0}",
             f"--mixed_precision={precision or args.mixed_precision}",
             "--fused_batchnorm" if fused else "--nofused_batchnorm",
             "--xla" if xla else "--noxla",
             "--checkpoint_every_steps=100000", "--eval_every_steps=100000", "--noexport_at_end",
             # Speed rows: no passes over the data beyond the final evaluation.
             "--high_loss_scan=0", "--noeval_figures", "--nosample_images"]
    if synthetic:
        flags.append("--synthetic_data")
    try:
        results, _ = run_trainer(model_dir, flags)
    except TrainerFailed as e:
        raise RuntimeError(f"trainer failed:\n{e.output[-3000:]}") from None
    with open(os.path.join(model_dir, "plan.json")) as f:
        compute_dtype = json.load(f)["precision"].split()[0]  # "bfloat16 (policy ...; why)"
    return {"images_per_second": results["images_per_second"],
            "warmup_seconds": results["first_loop_seconds"],
            "compute_dtype": compute_dtype,
            "input_wait_share": results.get("input_wait_share"),
            "checkpoint_and_summary_share": results.get("checkpoint_and_summary_share")}


def measure(args) -> dict:
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        if not args.data_dir:
            from data import photos
            args.data_dir = os.path.join(work, "photos")
            photos.build(args.data_dir, image_size=max(args.image_size, 96),
                         num_classes=8, per_class=args.images_per_class)
        for row in args.rows:
            print(f"bench: running {row} ...", file=sys.stderr, flush=True)
            if row in TRAINER_ROWS:
                rows[row] = _run_trainer(args, row, os.path.join(work, row))
            elif row in input_rows.ROWS:  # data paths without a model (bench/input_rows.py)
                rows[row] = input_rows.measure_row(row, args, work)
            else:
                rows[row] = _run_worker(row, args)
        flops = _run_worker("flops", args)["train_flops_per_image"]
    return {"rows": rows, "train_flops_per_image": flops, "config": vars(args)}


LABELS = {"trainer": "a  trainer", "trainer_auto": "a2 trainer, auto precision",
          "trainer_stock": "a3 trainer, stock Keras BN", "trainer_xla": "a4 trainer, --xla",
          "reference_fit": "b  reference fit",
          "tuned_fit": "c  tuned fit", "synthetic": "d  trainer, synthetic data",
          "synthetic_auto": "d2 trainer, synthetic, auto precision",
          "tf_keras": "g  tf_keras ResNet50, same step", "tf_keras_auto":
          "g2 tf_keras ResNet50, same step, auto precision", "input": "e  input pipeline alone"}


def table(measured: dict) -> str:
    """The rows as a Markdown table; MFU against row f's ceiling in each row's compute dtype."""
    rows, flops = measured["rows"], measured["train_flops_per_image"]
    matmul = rows.get("matmul", {})
    trainer = rows.get("trainer", {}).get("images_per_second")
    lines = ["| row | images/sec | x trainer | dtype | MFU | warm-up s |",
             "|---|---:|---:|---|---:|---:|"]
    for key, label in LABELS.items():
        if key not in rows:
            continue
        if "skipped" in rows[key]:
            lines.append(f"| {label} | skipped: {rows[key]['skipped']} | | | | |")
            continue
        rate, dtype = rows[key]["images_per_second"], rows[key].get("compute_dtype", "float32")
        ceiling = matmul.get(dtype)
        ratio = f"{rate / trainer:.2f}" if trainer else "-"
        mfu = f"{rate * flops / ceiling:.1%}" if ceiling and key != "input" else "-"
        lines.append(f"| {label} | {rate:.1f} | {ratio} | {dtype if key != 'input' else '-'} "
                     f"| {mfu} | {rows[key].get('warmup_seconds', 0):.1f} |")
    if matmul:
        size = measured["config"]["matmul_size"]
        for dtype in ("float32", "bfloat16"):
            lines.append(f"| f  matmul {size}^3 {dtype} | {matmul[dtype] / 1e9:.0f} GFLOP/s "
                         f"| | | | |")
    lines.append(f"\nTraining FLOPs per image: {flops / 1e9:.2f} GFLOP (3 x forward, TensorFlow "
                 "profiler).")
    if "trainer" in rows and rows["trainer"].get("input_wait_share") is not None:
        lines.append(f"Trainer: input wait {rows['trainer']['input_wait_share']:.1%} of loop "
                     f"time, checkpoints+summaries "
                     f"{rows['trainer']['checkpoint_and_summary_share']:.1%} of wall time.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="", help="bird-layout JPEG folders (default: built "
                        "from scikit-learn's sample photos in a temporary folder)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32, help="global batch")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--images_per_class", type=int, default=64)
    parser.add_argument("--matmul_size", type=int, default=4096, help="row f: N for N^3")
    parser.add_argument("--mixed_precision", default="none",
                        choices=("none", "bfloat16", "float16", "auto"),
                        help="rows a, a3, d (a2, d2 and g2 use auto)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--json", default="", help="also write the measurements here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS + input_rows.ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS + input_rows.ROWS)}")
    if min(args.image_size, args.batch_size, args.replicas, args.steps, args.warmup_steps,
           args.matmul_size) < 1:
        parser.error("--image_size, --batch_size, --replicas, --steps, --warmup_steps and "
                     "--matmul_size must be >= 1")
    if args.batch_size % args.replicas:
        parser.error(f"--batch_size={args.batch_size} does not divide by --replicas={args.replicas}")
    measured = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(measured, f, indent=2)
    print(table(measured))
    print(input_rows.table(measured["rows"]) if set(args.rows) & set(input_rows.ROWS) else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
