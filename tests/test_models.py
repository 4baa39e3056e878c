"""Models and recipes (issue 9): every registered model trains a step on two replicas and
round-trips through .keras; gradient accumulation, label smoothing, MixUp/CutMix, weight
averaging (EMA), fine-tuning from another run's model and the ImageNet failure without network.

Kept fast: tiny batches at the smallest image size, one trainer run in-process and one short
trainer subprocess."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from data import augment, datasets, layout
from data.spec import InputSpec
from models import registry, transfer
from tests.conftest import bench_run_trainer, run_trainer
from trainer.loop.step import Metrics, StepFunctions, cross_entropy


def _random_batch(n: int, size: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    return images, labels, np.ones(n, np.float32)


def _per_replica_batches(strategy, batch, per_replica: int):
    """The global batch cut into per-replica batches, as the trainer's pipelines deliver them."""
    return iter(strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensor_slices(batch).batch(per_replica)))


def _step_functions(strategy, model, optimizer, global_batch: int, **options) -> StepFunctions:
    with strategy.scope():
        metrics = Metrics.create("train"), Metrics.create("eval")
    return StepFunctions(strategy, model, optimizer, global_batch_size=global_batch,
                         train_metrics=metrics[0], eval_metrics=metrics[1], **options)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_list_models_prints_each_model_with_a_description_and_exits_0(capsys):
    from trainer import flags as trainer_flags
    with pytest.raises(SystemExit) as exit_info:
        trainer_flags.parse_flags_or_exit(["trainer", "--list_models"])  # no --model_dir needed
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == registry.model_names()
    assert set(registry.model_names()) >= {"small_resnet", "resnet50", "resnet50v2",
                                           "efficientnetb0", "mobilenetv3small", "convnexttiny"}
    assert all(len(line.split()) > 4 for line in lines)


TRACED_MODELS = ("small_resnet", "mobilenetv3small")


@pytest.fixture
def eagerly_for_large_models(request):
    """The larger keras.applications models run the step functions eagerly (the same Python
    code, tf.function off): tracing each of their two-replica training graphs costs 25-45 s on
    2 cores, five to ten times the eager step. small_resnet and one keras.applications model,
    mobilenetv3small (about 15 s), run traced, as the trainer runs them."""
    eager = request.node.callspec.params["name"] not in TRACED_MODELS
    tf.config.run_functions_eagerly(eager)
    yield eager
    tf.config.run_functions_eagerly(False)


@pytest.mark.parametrize("name", registry.model_names())
def test_model_trains_a_step_on_two_replicas_and_round_trips_through_keras_file(
        name, two_replicas, tmp_path, eagerly_for_large_models):
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    size, num_classes = max(32, registry.min_image_size(name)), 3
    images, labels, weights = _random_batch(4, size, num_classes)
    with two_replicas.scope():
        model = registry.build(name, num_classes, size)
        optimizer = keras.optimizers.SGD(learning_rate=0.01)
        optimizer.build(model.trainable_variables)
    assert model.get_layer("logits").dtype == "float32"
    assert model.output.shape[-1] == num_classes
    steps = _step_functions(two_replicas, model, optimizer, 4)
    head_before = model.get_layer("logits").get_weights()[0].copy()
    losses, *_ = steps.train_loop(_per_replica_batches(two_replicas, (images, labels, weights), 2),
                                 tf.constant(1))
    loss = float(losses.numpy()[0])
    assert np.isfinite(loss) and 0 < loss < 20, loss
    assert not np.allclose(head_before, model.get_layer("logits").get_weights()[0])

    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(images, training=False).numpy(),
                               model(images, training=False).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.quick
def test_pixels_are_normalised_inside_each_model_as_its_imagenet_weights_expect():
    """The preprocessing layers, applied to 0-255 pixels: ResNet50 subtracts the ImageNet
    mean (RGB order; the first convolution's channels are reversed for the ImageNet weights),
    ResNet50V2 scales to [-1, 1], EfficientNetB0's Normalization gives (x/255 - mean)/std^1.5
    like keras.applications' ImageNet build (Normalization(mean, std^2), then 1/sqrt(std))."""
    keras.mixed_precision.set_global_policy("float32")
    pixels = np.array([[[[0.0, 128.0, 255.0]]]], np.float32)
    resnet = registry.build("resnet50", 2, 32)
    np.testing.assert_allclose(resnet.get_layer("normalize")(pixels).numpy().ravel(),
                               [-123.68, 128 - 116.779, 255 - 103.939], atol=1e-3)
    v2 = registry.build("resnet50v2", 2, 32)
    np.testing.assert_allclose(v2.get_layer("normalize")(pixels).numpy().ravel(),
                               [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    efficientnet = registry.build("efficientnetb0", 2, 32)
    base = [layer for layer in efficientnet.layers if isinstance(layer, keras.Model)][0]
    norm = [layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)][0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(norm(pixels / 255.0).numpy().ravel(),
                               (pixels.ravel() / 255.0 - mean) / std ** 1.5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Recipes in the step
# ---------------------------------------------------------------------------------------------
def _bn_free_model(num_classes: int) -> keras.Model:
    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Rescaling(1 / 127.5, offset=-1),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_classes, kernel_regularizer=keras.regularizers.L2(1e-3),
                           name="logits"),
    ])


def _train_bn_free(strategy, grad_accum_steps: int, num_steps: int = 2):
    images, labels, weights = _random_batch(16 * num_steps, 16, 5, seed=1)
    with strategy.scope():
        model = _bn_free_model(5)
        optimizer = keras.optimizers.SGD(learning_rate=keras.optimizers.schedules.CosineDecay(
            0.5, decay_steps=num_steps))
        optimizer.build(model.trainable_variables)
    steps = _step_functions(strategy, model, optimizer, 16, label_smoothing=0.1,
                            grad_accum_steps=grad_accum_steps)
    losses, *_ = steps.train_loop(_per_replica_batches(strategy, (images, labels, weights), 8),
                                 tf.constant(num_steps))
    updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
    return model.get_weights(), losses.numpy(), updates, \
        steps.train_metrics.results()


@pytest.mark.quick
def test_gradient_accumulation_over_k_micro_batches_equals_one_big_batch(two_replicas):
    """Global batch 16 on two replicas: 8 per replica at once, or 4 micro-batches of 2 with
    one optimizer update; the same weights, losses, metrics and learning-rate steps."""
    whole, whole_losses, whole_updates, whole_metrics = _train_bn_free(two_replicas, 1)
    accumulated, accumulated_losses, updates, metrics = _train_bn_free(two_replicas, 4)
    assert whole_updates == updates == 2  # the schedule counts optimizer updates
    np.testing.assert_allclose(accumulated_losses, whole_losses, rtol=1e-5)
    for a, b in zip(accumulated, whole):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert metrics["images"] == whole_metrics["images"] == 32
    assert metrics["accuracy"] == pytest.approx(whole_metrics["accuracy"])
    initial = _bn_free_model(5).get_weights()
    assert not np.allclose(initial[-2], whole[-2])  # it did train


@pytest.mark.quick
def test_backbone_lr_multiplier_scales_only_the_backbone_update_on_two_replicas(two_replicas,
                                                                              tiny_dir):
    from trainer import flags as trainer_flags
    from trainer.config import RunPlan
    from trainer.loop.optimization import make_optimizer
    images, labels, weights = _random_batch(16, 16, 5, seed=6)
    deltas = {}
    for multiplier in (1.0, 0.25):
        config = trainer_flags.config_from_argv([
            f"--data_dir={tiny_dir}", "--model_dir=/tmp/unused", "--optimizer=sgd",
            "--momentum=0", "--warmup_epochs=0", "--base_lr=0.5",
            f"--backbone_lr_multiplier={multiplier}"])
        plan = RunPlan.make(config, 2, 1000)
        with two_replicas.scope():
            model = _bn_free_model(5)
            optimizer = make_optimizer(config, plan, model, tf.Variable(0, dtype=tf.int64))
        before = model.get_weights()
        steps = _step_functions(two_replicas, model, optimizer, 16)
        steps.train_loop(_per_replica_batches(two_replicas, (images, labels, weights), 8),
                         tf.constant(1))
        deltas[multiplier] = [a - b for a, b in zip(model.get_weights(), before)]
    conv_kernel, head_kernel = 0, 2  # conv kernel, conv bias, head kernel, head bias
    np.testing.assert_allclose(deltas[0.25][conv_kernel], 0.25 * deltas[1.0][conv_kernel],
                               rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(deltas[0.25][head_kernel], deltas[1.0][head_kernel], rtol=1e-5)
    assert np.abs(deltas[1.0][conv_kernel]).max() > 1e-4


@pytest.mark.quick
@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_weight_decay_shrinks_kernels_and_leaves_biases_and_normalisation_alone(
        optimizer_name, tiny_dir):
    """A zero gradient moves nothing under Adam(W) or SGD, so one update is the decoupled
    weight decay alone: every kernel times (1 - lr * decay), every 1-D variable unchanged."""
    from trainer import flags as trainer_flags
    from trainer.config import RunPlan
    from trainer.loop.optimization import make_optimizer
    config = trainer_flags.config_from_argv([
        f"--data_dir={tiny_dir}", "--model_dir=/tmp/unused", f"--optimizer={optimizer_name}",
        "--weight_decay=0.1", "--warmup_epochs=0", "--base_lr=0.5"])
    model = registry.build("small_resnet", 3, 16)
    optimizer = make_optimizer(config, RunPlan.make(config, 1, 100), model,
                               tf.Variable(0, dtype=tf.int64))
    variables = model.trainable_variables
    before = [np.array(v) for v in variables]
    shrink = 1 - 0.1 * float(optimizer.learning_rate)
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    one_dimensional = 0
    for variable, old in zip(variables, before):
        if len(variable.shape) <= 1:
            one_dimensional += 1
            np.testing.assert_array_equal(np.array(variable), old, err_msg=variable.path)
        else:
            np.testing.assert_allclose(np.array(variable), old * shrink, rtol=1e-6,
                                       err_msg=variable.path)
    assert one_dimensional > 5 and shrink < 0.99


@pytest.mark.quick
def test_label_smoothing_and_soft_labels_give_keras_cross_entropy():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(6, 4)) * 3, tf.float32)
    labels = tf.constant([0, 1, 2, 3, 1, 0])
    one_hot = tf.one_hot(labels, 4)
    for smoothing in (0.0, 0.1):
        reference = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=smoothing, reduction=None)(one_hot, logits)
        np.testing.assert_allclose(cross_entropy(labels, logits, smoothing), reference, rtol=1e-5)
        np.testing.assert_allclose(cross_entropy(one_hot, logits, smoothing), reference,
                                   rtol=1e-5)
    soft = tf.constant(rng.dirichlet(np.ones(4), size=6), tf.float32)
    expected = -np.sum(soft.numpy() * tf.nn.log_softmax(logits).numpy(), axis=1)
    np.testing.assert_allclose(cross_entropy(soft, logits), expected, rtol=1e-5)


@pytest.mark.quick
def test_mixup_and_cutmix_labels_sum_to_one_and_describe_the_images():
    images, labels, _ = _random_batch(6, 16, 4, seed=2)
    labels = np.array([0, 1, 2, 3, 1, 2], np.int32)
    seen_cutmix = seen_mixup = False
    for seed in range(12):
        mix = augment.Mix(4, mixup_alpha=0.4, cutmix_alpha=1.0)
        mixed, soft = augment.mix_batch(images, labels, tf.constant([seed, 7], tf.int64), mix)
        mixed, soft = mixed.numpy(), soft.numpy()
        assert soft.shape == (6, 4) and mixed.dtype == np.float32
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        # Example 0 is mixed with example 5 (the batch reversed), labels 0 and 2.
        own = soft[0, 0]
        assert soft[0, 1] == soft[0, 3] == 0 and soft[0, 2] == pytest.approx(1 - own, abs=1e-6)
        partner = images[::-1].astype(np.float32)
        from_partner = np.all(np.isclose(mixed, partner), axis=-1)[0]
        from_self = np.all(np.isclose(mixed, images.astype(np.float32)), axis=-1)[0]
        if np.all(from_partner | from_self):
            seen_cutmix = True  # CutMix: label weight = share of own pixels
            assert own == pytest.approx(from_self.mean(), abs=1e-6)
        else:
            seen_mixup = True
            np.testing.assert_allclose(mixed[0], own * images[0] + (1 - own) * partner[0],
                                       rtol=1e-4, atol=1e-3)
    assert seen_cutmix and seen_mixup


@pytest.mark.quick
def test_mixed_training_batches_are_soft_and_resume_at_the_same_batch(demo_dir):
    names = layout.train_class_names(str(demo_dir))
    split = layout.scan_split(str(demo_dir), "train", names)
    files, labels = split.files[:40], split.labels[:40]

    def batches(start_step):
        spec = InputSpec(16, 8, seed=3, cache="none",
                         augment=augment.Augment(crop_min_area=0.5, flip=True,
                                                 randaugment=(2, 9)),
                         mix=augment.Mix(len(names), mixup_alpha=0.5, cutmix_alpha=0.5))
        return list(datasets.train_dataset(files, labels, spec, start_step=start_step,
                                           total_steps=4))
    whole, resumed = batches(0), batches(2)
    images, soft, weights = whole[2]
    assert images.dtype == tf.float32 and soft.shape == (8, len(names))
    np.testing.assert_allclose(soft.numpy().sum(axis=1), 1.0, atol=1e-6)
    for a, b in zip(whole[2:], resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.numpy(), y.numpy())


@pytest.mark.quick
def test_randaugment_ops_keep_shape_and_range_and_are_seeded():
    images, _, _ = _random_batch(1, 24, 2, seed=5)
    image = tf.constant(images[0])
    for name, op in augment.RANDAUGMENT_OPS:
        for sign in (-1.0, 1.0):
            out = op(tf.cast(image, tf.float32), 0.9, tf.constant(sign)).numpy()
            assert out.shape == (24, 24, 3), name
            assert np.isfinite(out).all() and out.min() >= -1e-3 and out.max() <= 255 + 1e-3, name
            if name not in ("identity", "auto_contrast", "equalize"):  # random pixels: 0..255
                assert not np.allclose(out, images[0]), (name, sign)
    seed = tf.constant([1, 2], tf.int64)
    first = augment.rand_augment(image, seed, 2, 9).numpy()
    np.testing.assert_array_equal(first, augment.rand_augment(image, seed, 2, 9).numpy())
    assert first.dtype == np.uint8 and first.shape == (24, 24, 3)
    others = [augment.rand_augment(image, tf.constant([1, s], tf.int64), 2, 9).numpy()
              for s in range(3, 9)]
    assert sum(not np.array_equal(first, other) for other in others) >= 4


# ---------------------------------------------------------------------------------------------
# Fine-tuning, freezing, EMA: the trainer end to end
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(demo_dir, tmp_path_factory) -> Path:
    """3 of the demo's classes, 8 train and 2 valid images each."""
    root = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 8), ("valid", 2)):
        for name in ("eight", "five", "four"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((demo_dir / split / name).iterdir())[:count]:
                shutil.copy(path, root / split / name / path.name)
    return root


@pytest.fixture(scope="module")
def donor_file(tmp_path_factory) -> Path:
    """A small_resnet with 5 classes (another class count than tiny_dir's 3), saved."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(42)
    model = registry.build("small_resnet", 5, 32)
    for layer in transfer.weight_layers(model):  # moving statistics unlike a fresh model's
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.25, np.float32))
    path = tmp_path_factory.mktemp("donor") / "donor.keras"
    model.save(path)
    return path


def _layer_weights(model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in transfer.weight_layers(model)}


@pytest.mark.quick
def test_finetune_from_keras_file_of_another_class_count_then_freeze_and_unfreeze(
        tiny_dir, donor_file, tmp_path):
    from trainer import flags as trainer_flags
    from trainer.loop import pretrained
    config = trainer_flags.config_from_argv([
        f"--data_dir={tiny_dir}", f"--model_dir={tmp_path / 'run'}", "--model=small_resnet",
        "--image_size=32", f"--pretrained={donor_file}"])
    donor = pretrained.load_donor(config)
    keras.utils.set_random_seed(7)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = registry.build("small_resnet", 3, 32)
        report = transfer.copy_weights_by_name(donor.model, model)
        optimizer = keras.optimizers.SGD(learning_rate=0.1)
        optimizer.build(model.trainable_variables)
    assert report.head_replaced and report.shape_mismatch == ["logits"]
    assert report.backbone_copied == report.total - 1 and not report.not_found
    source, loaded = _layer_weights(donor.model), _layer_weights(model)
    for name, values in loaded.items():
        if name != "logits":
            for a, b in zip(values, source[name]):
                np.testing.assert_array_equal(a, b, err_msg=name)
    assert loaded["logits"][0].shape == (128, 3)

    # Frozen: only the head trains; BatchNorm runs in inference mode (moving statistics kept).
    steps = _step_functions(strategy, model, optimizer, 8)
    transfer.set_backbone_trainable(model, False)
    steps.retrace()
    images, labels, weights = _random_batch(8, 32, 3, seed=4)
    batch = tf.data.Dataset.from_tensors((images, labels, weights)).repeat(2)
    steps.train_loop(iter(strategy.experimental_distribute_dataset(batch)), tf.constant(1))
    after = _layer_weights(model)
    for name, values in after.items():
        same = all(np.array_equal(a, b) for a, b in zip(values, loaded[name]))
        assert same == (name != "logits"), name
    transfer.set_backbone_trainable(model, True)
    steps.retrace()
    steps.train_loop(iter(strategy.experimental_distribute_dataset(batch)), tf.constant(1))
    unfrozen = _layer_weights(model)
    assert not np.array_equal(unfrozen["stem_conv"][0], after["stem_conv"][0])
    assert not np.array_equal(unfrozen["stem_bn"][2], after["stem_bn"][2])  # moving mean


@pytest.mark.quick
def test_pretrained_weights_file_loads_with_its_own_class_count_or_fails_in_one_line(
        tiny_dir, donor_file, tmp_path):
    """--pretrained=FILE.weights.h5: the head's class count is read from the file (5, the
    donor's, not the new run's 3) and every weight is the saved one; weights of another model
    are refused with one line naming the file."""
    from trainer import flags as trainer_flags
    from trainer.loop import pretrained
    saved = keras.models.load_model(donor_file)
    weights_file = tmp_path / "donor.weights.h5"
    saved.save_weights(weights_file)
    other_file = tmp_path / "other.weights.h5"
    registry.build("mobilenetv3small", 5, 32).save_weights(other_file)

    def donor_of(path, model="small_resnet"):
        config = trainer_flags.config_from_argv([
            f"--data_dir={tiny_dir}", f"--model_dir={tmp_path / 'run'}", f"--model={model}",
            "--image_size=32", f"--pretrained={path}"])
        return pretrained.load_donor(config)

    donor = donor_of(weights_file)
    assert donor.model.output.shape[-1] == 5 and not donor.skip_head
    for a, b in zip(donor.model.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(pretrained.PretrainedError) as error:
        donor_of(other_file)
    message = str(error.value)
    assert message.startswith(f"--pretrained={other_file}: not the weights of a "
                              f"--model=small_resnet"), message
    assert "\n" not in message


def test_finetuned_run_beats_the_same_run_from_scratch_on_a_small_budget(demo_dir, tmp_path,
                                                                         monkeypatch):
    """bench.transfer at a small budget, three trainer processes: a donor learns the digits
    zero..five; then six..nine with 3 training images per class (4 classes: a new head) for
    20 steps, once from scratch and once with --pretrained=<the donor's model_dir>, every other
    flag, the data order and the seed the same. (Measured at this budget with seeds 0 and 1:
    57-61% from scratch, 69-75% fine-tuned; the larger default budget is in the README.)
    Valid is evaluated only at the end and the unread outputs are off (the trainers start as
    the suite's do, conftest.bench_run_trainer): with one step per target epoch the per-epoch
    evaluations were most of the cost, and the final weights (all the test reads) are the same
    without them."""
    from bench import transfer
    monkeypatch.setattr(transfer, "run_trainer", bench_run_trainer)
    lines = []
    report = transfer.compare(str(tmp_path), donor_steps=60, target_steps=20, train_per_class=3,
                              seeds=[0], extra_flags=["--eval_every_steps=100000"],
                              digits=str(demo_dir), log=lines.append)
    scratch, finetuned = report["scratch"][0], report["finetuned"][0]
    assert scratch["pretrained"] is None
    assert finetuned["pretrained"].startswith(
        f"pretrained: the small_resnet of {tmp_path / 'runs' / 'donor'}"), finetuned
    assert "(6 classes)" in finetuned["pretrained"] and "new head" in finetuned["pretrained"]
    assert report["donor"]["splits"]["test"]["accuracy"] > 0.8, report["donor"]
    assert finetuned["test_accuracy"] >= scratch["test_accuracy"] + 0.05, lines
    assert finetuned["test_loss"] < scratch["test_loss"], lines
    assert (tmp_path / "transfer.json").is_file()


def test_ema_run_evaluates_saves_and_exports_the_averaged_weights(tiny_dir, donor_file, tmp_path,
                                                                   capsys):
    """One in-process run with --pretrained (another class count), a frozen first epoch,
    MixUp, label smoothing, gradient accumulation and --ema_decay: the checkpoint holds the
    averages; model.keras, the export and the tools' restore hold them, not the raw weights."""
    from trainer import flags as trainer_flags
    from trainer.loop import train
    from trainer.state.checkpoints import restore_model
    from trainer.state.run_dir import SavedRun
    model_dir = tmp_path / "run"
    config = trainer_flags.config_from_argv([
        f"--data_dir={tiny_dir}", f"--model_dir={model_dir}", "--model=small_resnet",
        "--image_size=32", "--batch_size=8", "--train_steps=6", "--warmup_epochs=0",
        "--base_lr=0.01", "--distribution_strategy=one_device", "--steps_per_loop=3",
        "--noeval_figures", "--ema_decay=0.9", f"--pretrained={donor_file}",
        "--freeze_backbone_epochs=1", "--mixup_alpha=0.4", "--label_smoothing=0.1",
        "--grad_accum_steps=2", "--backbone_lr_multiplier=0.5", "--crop_min_area=1",
        "--norandom_flip", "--high_loss_scan=0"])
    results = train.run(config)
    out = capsys.readouterr().out
    assert "copied the weights of" in out and "new head" in out, out
    assert "backbone frozen until step 3" in out and "backbone unfrozen at step 3" in out, out
    assert results["steps"] == 6 and results["weights"].startswith("moving average")

    run = SavedRun.load(str(model_dir))
    checkpoint = run.checkpoint_path("latest")
    averaged = restore_model(run, checkpoint).get_weights()
    raw_model = registry.build("small_resnet", 3, 32)
    tf.train.Checkpoint(model=raw_model).restore(checkpoint).expect_partial()
    raw = raw_model.get_weights()
    assert any(not np.allclose(a, r, atol=1e-6) for a, r in zip(averaged, raw))
    for path in (model_dir / "model.keras", Path(results["export_dir"]) / "model.keras"):
        saved = keras.models.load_model(path).get_weights()
        for a, s in zip(averaged, saved):
            np.testing.assert_allclose(s, a, rtol=1e-6, atol=1e-7, err_msg=str(path))
    assert results["splits"]["valid"]["images"] == 6


def test_pretrained_imagenet_without_network_fails_in_seconds_with_one_line(tiny_dir, tmp_path):
    """No route to the weights (a proxy that refuses connections, an empty Keras cache): the
    trainer stops before the data check with one line and exit code 1."""
    dead_proxy = "http://127.0.0.1:9"
    start = time.time()
    result = run_trainer(f"--data_dir={tiny_dir}", f"--model_dir={tmp_path / 'run'}",
                         "--model=mobilenetv3small", "--image_size=32", "--pretrained=imagenet",
                         "--distribution_strategy=one_device", "--train_steps=1",
                         env={"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": dead_proxy,
                              "https_proxy": dead_proxy, "HTTP_PROXY": dead_proxy,
                              "http_proxy": dead_proxy, "NO_PROXY": "", "no_proxy": ""},
                         check=False, timeout=120)
    seconds = time.time() - start
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trainer: --pretrained=imagenet: could not get the ImageNet "
                               "weights of mobilenetv3small"), lines[0]
    assert seconds < 60, seconds  # TensorFlow's import included; no download wait
    assert not (tmp_path / "run" / "checkpoints").exists()


JOB_CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.cfg")
                     if not p.name.endswith("_base.cfg"))


@pytest.mark.quick
@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_each_config_parses_and_starts_with_command_hardware_and_expected_result(path,
                                                                                 demo_dir):
    from trainer import flags as trainer_flags
    if path.name.startswith("birds_"):  # the shared settings come from one base file
        assert "\n--flagfile=configs/birds_base.cfg\n" in path.read_text()
    header = path.read_text().split("\n--")[0]
    for word in ("Command:", "Hardware:", "Expected"):
        assert word in header, (path.name, word)
    # A local --data_dir must exist to parse; the demo's is built on first use, so point
    # local ones at the test copy (s3:// sources parse as they are).
    local_data = [] if "--data_dir=s3://" in path.read_text() else [f"--data_dir={demo_dir}"]
    config = trainer_flags.config_from_argv([f"--flagfile={path}", *local_data])
    assert config.model in registry.model_names()
