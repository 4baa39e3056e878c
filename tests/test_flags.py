"""Every invalid flag value or combination: one line on stderr naming the flag and the rule, a
non-zero exit code, no traceback, and nothing built. The flag rules run in-process through the
trainer's own parser (trainer.flags.parse_flags_or_exit); a few real processes check the whole
command, including the rules that need the replica count."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_trainer

pytestmark = pytest.mark.quick


def _write_jpegs(folder: Path, count: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits().images
    for i in range(count):
        image = Image.fromarray((digits[i] * 15).astype("uint8"), mode="L").resize((16, 16))
        image.save(folder / f"{i}.jpg")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny valid dataset (2 classes x 4 images in train and valid) and broken variants."""
    root = tmp_path_factory.mktemp("flags")
    for split in ("train", "valid"):
        for name in ("CLASS A", "CLASS B"):
            _write_jpegs(root / "ok" / split / name, 4)
    (root / "no_valid" / "train" / "CLASS A").mkdir(parents=True)
    (root / "no_train" / "valid" / "CLASS A").mkdir(parents=True)
    (root / "a_file").write_text("not a folder\n")
    (root / "bad.cfg").write_text("# a flagfile with one bad line\n--batch_size=0\n")
    return root


def _base(root: Path) -> list[str]:
    return [f"--data_dir={root / 'ok'}", f"--model_dir={root / 'run'}", "--model=small_resnet",
            "--image_size=32", "--distribution_strategy=one_device", "--train_steps=2"]


def _parse_error(argv: list[str]) -> tuple[int, str]:
    """Run the trainer's flag parser on argv; (exit code, stderr) of the error it must raise."""
    from trainer import flags as trainer_flags
    trainer_flags.flags.FLAGS.unparse_flags()
    stderr = io.StringIO()
    saved, sys.stderr = sys.stderr, stderr
    try:
        with pytest.raises(SystemExit) as exit_info:
            trainer_flags.parse_flags_or_exit(["trainer", *argv])
    finally:
        sys.stderr = saved
        trainer_flags.flags.FLAGS.unparse_flags()
    return exit_info.value.code, stderr.getvalue()


# (extra flags, text the single stderr line must contain). `{root}` is the fixture's folder.
RULES = [
    # sizes and counts of zero or below
    (["--image_size=0"], "flag --image_size=0: 0 is not integer >= 8"),
    (["--image_size=-32"], "flag --image_size=-32: -32 is not integer >= 8"),
    (["--batch_size=0"], "flag --batch_size=0: 0 is not a positive integer"),
    (["--batch_size=-8"], "flag --batch_size=-8: -8 is not a positive integer"),
    (["--steps_per_loop=0"], "flag --steps_per_loop=0: 0 is not a positive integer"),
    (["--checkpoint_every_steps=0"], "flag --checkpoint_every_steps=0: 0 is not a positive"),
    (["--keep_checkpoints=0"], "flag --keep_checkpoints=0: 0 is not a positive integer"),
    (["--eval_batch_size=-1"], "flag --eval_batch_size=-1: -1 is not a non-negative integer"),
    (["--train_steps=-1"], "flag --train_steps=-1: -1 is not a non-negative integer"),
    (["--eval_every_steps=-1"], "flag --eval_every_steps=-1: -1 is not a non-negative integer"),
    (["--cpu_devices=-1"], "flag --cpu_devices=-1: -1 is not a non-negative integer"),
    (["--train_steps=0", "--epochs=0"], "give a training length: --epochs > 0 or --train_steps"),
    (["--train_steps=0", "--epochs=inf"], "flag --epochs=inf: must be a finite number"),
    (["--base_lr=0"], "flag --base_lr=0.0: must be > 0"),
    (["--base_lr=-0.1"], "flag --base_lr=-0.1: -0.1 is not a non-negative number"),
    (["--base_lr=nan"], "flag --base_lr=nan: must be a finite number"),
    (["--data_service_timeout=0.5"],
     "flag --data_service_timeout=0.5: must be a finite number of seconds >= 1"),
    (["--data_service_timeout=nan"],
     "flag --data_service_timeout=nan: must be a finite number of seconds >= 1"),
    (["--warmup_epochs=-1"], "flag --warmup_epochs=-1: -1.0 is not a non-negative number"),
    (["--crop_min_area=0"], "flag --crop_min_area=0: 0.0 is not a number in the range [0.01"),
    (["--crop_min_area=nan"], "flag --crop_min_area=nan: must be a finite number"),
    (["--eval_crop=0"], "flag --eval_crop=0.0: must be > 0"),
    (["--eval_crop=1.5"], "flag --eval_crop=1.5: 1.5 is not a number in the range [0.0, 1.0]"),
    (["--eval_crop=nan"], "flag --eval_crop=nan: must be a finite number"),
    (["--momentum=1.5"], "flag --momentum=1.5: 1.5 is not a number in the range [0.0, 1.0]"),
    (["--clip_grad_norm=inf"], "flag --clip_grad_norm=inf: must be a finite number"),
    (["--seed=-1"], "flag --seed=-1: -1 is not an integer in the range [0, 4294967295]"),
    # unknown names
    (["--model=vgg16"], "flag --model=vgg16: value should be one of <convnexttiny|"
                        "efficientnetb0|mobilenetv3small|resnet50|resnet50v2|small_resnet>"),
    (["--optimizer=rmsprop"], "flag --optimizer=rmsprop: value should be one of <adam|adamw|sgd>"),
    (["--distribution_strategy=tpu"], "flag --distribution_strategy=tpu: value should be one of"),
    (["--mixed_precision=fp8"], "flag --mixed_precision=fp8: value should be one of"),
    (["--on_bad_file=ignore"], "flag --on_bad_file=ignore: value should be one of <skip|fail>"),
    (["--batch_size=abc"], "flag --batch_size=abc: invalid literal for int()"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    # combinations
    (["--model=resnet50", "--image_size=16"], "--model=resnet50 needs --image_size >= 32"),
    (["--weight_decay=0.1", "--optimizer=adam"], "--weight_decay > 0 needs --optimizer=adamw or"),
    (["--cpu_devices=2", "--distribution_strategy=one_device"],
     "--cpu_devices > 1 needs --distribution_strategy=mirrored"),
    (["--cpu_devices=2", "--distribution_strategy=multi_worker_mirrored"],
     "--cpu_devices > 1 needs --distribution_strategy=mirrored"),
    # models and recipes
    (["--model=efficientnetb0", "--image_size=16"], "--model=efficientnetb0 needs --image_size >="),
    (["--pretrained=imagenet"], "--pretrained=imagenet: --model=small_resnet has no ImageNet"),
    (["--pretrained={root}/missing.keras"], "--pretrained={root}/missing.keras: no such file"),
    (["--pretrained={root}/bad.cfg"], "--pretrained={root}/bad.cfg: not a .keras or .weights.h5"),
    (["--pretrained={root}"], "--pretrained={root}: a folder, but not the model_dir of a run"),
    (["--batch_size=32", "--grad_accum_steps=3"],
     "--batch_size=32 does not divide into --grad_accum_steps=3 micro-batches"),
    (["--grad_accum_steps=0"], "flag --grad_accum_steps=0: 0 is not a positive integer"),
    (["--label_smoothing=1"], "flag --label_smoothing=1.0: must be below 1"),
    (["--mixup_alpha=-0.2"], "flag --mixup_alpha=-0.2: -0.2 is not a non-negative number"),
    (["--cutmix_alpha=nan"], "flag --cutmix_alpha=nan: must be a finite number"),
    (["--ema_decay=1"], "flag --ema_decay=1.0: must be below 1"),
    (["--randaugment=2"], "flag --randaugment=2: --randaugment must be N,M with N >= 1"),
    (["--randaugment=2,11"], "flag --randaugment=2,11: --randaugment must be N,M"),
    (["--backbone_lr_multiplier=0"], "flag --backbone_lr_multiplier=0.0: must be > 0"),
    (["--freeze_backbone_epochs=-1"], "flag --freeze_backbone_epochs=-1: -1.0 is not a non-neg"),
    (["--early_stopping_start=soon"], "flag --early_stopping_start=soon: --early_stopping_start "
                                      "must be warmup, a step N (or Nsteps), Xepochs"),
    (["--early_stopping_start=1.5"], "flag --early_stopping_start=1.5: --early_stopping_start"),
    (["--early_stopping_start=-3"], "flag --early_stopping_start=-3: --early_stopping_start"),
    (["--early_stopping_start=nanepochs"], "flag --early_stopping_start=nanepochs: "),
    # folders and files
    (["--data_dir={root}/missing"], "flag --data_dir={root}/missing: no such folder"),
    (["--data_dir={root}/no_valid"], "flag --data_dir={root}/no_valid: has no valid/ folder"),
    (["--data_dir={root}/no_train"], "flag --data_dir={root}/no_train: has no train/ folder"),
    (["--model_dir={root}/a_file"], "flag --model_dir={root}/a_file: exists and is not a folder"),
    (["--model_dir={root}/a_file/run"], "cannot be created: {root}/a_file is a file"),
    (["--model_dir="], "flag --model_dir=: must not be empty"),
    (["--model_dir={root}/runs/run?"], "flag --model_dir={root}/runs/run?: must not contain the "
                                       "glob characters ?: TensorFlow deletes old checkpoints by "
                                       "glob pattern"),
    (["--model_dir={root}/runs/lr[1]"], "must not contain the glob characters []"),
    (["--model_dir=gs://bucket/runs/a"], "flag --model_dir=gs://bucket/runs/a: must be a local "
                                         "folder, not a URL"),
    (["--flagfile={root}/missing.cfg"], "Unable to open flagfile: [Errno 2] No such file or "
                                        "directory: '{root}/missing.cfg'"),
    (["--flagfile={root}"], "Unable to open flagfile: [Errno 21] Is a directory: '{root}'"),
    (["--flagfile={root}/bad.cfg"], "flag --batch_size=0: 0 is not a positive integer"),
]


@pytest.mark.parametrize("extra, expected", RULES, ids=[" ".join(r[0]) for r in RULES])
def test_each_invalid_flag_is_one_line_naming_the_flag_and_the_rule(dataset, extra, expected):
    argv = _base(dataset) + [arg.format(root=dataset) for arg in extra]
    code, stderr = _parse_error(argv)
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("trainer: flag error: ")
    assert expected.format(root=dataset) in lines[0]


@pytest.mark.parametrize("missing, expected", [
    ("--data_dir", "--data_dir is required"),
    ("--model_dir", "flag --model_dir=None: Flag --model_dir must have a value other than None."),
])
def test_a_missing_required_flag_is_named(dataset, missing, expected):
    code, stderr = _parse_error([a for a in _base(dataset) if not a.startswith(missing)])
    assert code == 2 and len(stderr.splitlines()) == 1 and expected in stderr


def test_the_valid_base_flags_parse(dataset):
    from trainer import flags as trainer_flags
    config = trainer_flags.config_from_argv(_base(dataset))
    assert config.on_bad_file == "skip" and config.data_dir == str(dataset / "ok")


def test_positional_arguments_are_refused(capsys):
    from trainer import main
    assert main.main(["trainer", "extra"]) == 2
    assert capsys.readouterr().err == ("trainer: unexpected arguments ['extra'] (flags look like "
                                       "--name=value)\n")


# ============================================================================================
# Real processes
# ============================================================================================
CHECK_NO_TENSORFLOW = """
import sys
sys.argv = ["trainer"] + sys.argv[1:]
from trainer import main
try:
    main.entry()
finally:
    if "tensorflow" in sys.modules:
        print("tensorflow was imported", file=sys.stderr)
"""


def test_a_flag_error_exits_before_tensorflow_loads(dataset):
    result = subprocess.run([sys.executable, "-c", CHECK_NO_TENSORFLOW, *_base(dataset),
                             "--batch_size=0"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("trainer: flag error: flag --batch_size=0: 0 is not a positive "
                             "integer\n")


def test_a_batch_that_does_not_divide_by_the_replicas_stops_before_the_model(dataset, tmp_path):
    model_dir = tmp_path / "run"
    result = run_trainer(*_base(dataset), f"--model_dir={model_dir}",
                         "--distribution_strategy=mirrored", "--cpu_devices=2", "--batch_size=7",
                         check=False)
    assert result.returncode == 1
    assert result.stderr == "trainer: --batch_size: global batch 7 does not divide by 2 replicas\n"
    assert not (model_dir / "config.json").exists() and not (model_dir / "checkpoints").exists()


def test_multi_worker_without_a_cluster_stops_before_the_data_and_model(dataset, tmp_path,
                                                                        monkeypatch, capsys):
    from trainer import flags as trainer_flags
    from trainer import main
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model_dir = tmp_path / "run"
    trainer_flags.flags.FLAGS.unparse_flags()
    try:
        trainer_flags.parse_flags_or_exit(["trainer", *_base(dataset), f"--model_dir={model_dir}",
                                           "--distribution_strategy=multi_worker_mirrored"])
        assert main.main(["trainer"]) == 1
    finally:
        trainer_flags.flags.FLAGS.unparse_flags()
    assert capsys.readouterr().err == (
        "trainer: --distribution_strategy=multi_worker_mirrored needs TF_CONFIG (or a SLURM job) "
        "describing the cluster\n")
    assert not model_dir.exists()


def test_run_trainer_helper_sees_a_flag_error(dataset):
    result = run_trainer(*_base(dataset), "--optimizer=lamb", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("trainer: flag error: flag --optimizer=lamb: value should "
                                     "be one of <adam|adamw|sgd>")
