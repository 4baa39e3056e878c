"""Does fine-tuning pay? A from-scratch run against the same run started from a donor's weights.

    python -m bench.transfer [--work_dir=DIR] [--donor_steps=N] [--target_steps=N]
                             [--train_per_class=N] [--seeds=0,1,2] [-- trainer flags]

Offline and real: two datasets cut from scikit-learn's handwritten digits (data/demo.py) with
no class in common. The donor learns the digits zero..five from all their training images;
the target task is six..nine with only --train_per_class training images each (another class
count, so the fine-tuned run gets a new head), evaluated on all their valid/test images. Each
target run is the trainer as a user runs it (`python -m trainer.main`, its own process), with
the same flags, data and step budget; the fine-tuned one adds --pretrained=<donor's model_dir>.
Prints one line per run and the mean per arm; the numbers go to WORK_DIR/transfer.json.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from bench import OneLineErrorParser, TrainerFailed, run_trainer
from data import demo, files

DONOR_CLASSES = demo.CLASS_NAMES[:6]
TARGET_CLASSES = demo.CLASS_NAMES[6:]
# Small-model settings shared by every run; flags after `--` are appended and win.
COMMON_FLAGS = ("--model=small_resnet", "--image_size=32", "--batch_size=12",
                "--optimizer=adam", "--base_lr=0.003", "--warmup_epochs=0",
                "--crop_min_area=0.6", "--norandom_flip", "--distribution_strategy=one_device",
                "--noeval_figures", "--noexport_at_end")


def make_datasets(work_dir: str, train_per_class: int,
                  digits: str | None = None) -> tuple[str, str]:
    """WORK_DIR/donor and WORK_DIR/target (rebuilt each time: they are cheap), cut from the
    demo dataset at `digits` (built into WORK_DIR/digits when not given)."""
    digits = digits or os.path.join(work_dir, "digits")
    if not os.path.isdir(digits):
        demo.build(digits)
    made = []
    for name, classes, limit in (("donor", DONOR_CLASSES, None),
                                 ("target", TARGET_CLASSES, train_per_class)):
        dest = os.path.join(work_dir, name)
        staging = files.staging_dir_for(dest, f".{name}-")
        counts = {}
        for split in ("train", "valid", "test"):
            counts[split] = 0
            for class_name in classes:
                source = os.path.join(digits, split, class_name)
                names = sorted(os.listdir(source))
                if split == "train" and limit is not None:
                    names = names[:limit]
                os.makedirs(os.path.join(staging, split, class_name))
                for file_name in names:
                    shutil.copyfile(os.path.join(source, file_name),
                                    os.path.join(staging, split, class_name, file_name))
                counts[split] += len(names)
        files.publish_staged_dataset(staging, dest, counts)
        made.append(dest)
    return made[0], made[1]


def train(model_dir: str, flags: list[str]) -> dict:
    """One fresh trainer run; returns its results.json plus the wall time and, when it started
    from a donor, its console line saying what was copied."""
    shutil.rmtree(model_dir, ignore_errors=True)  # a fresh run, never a resume
    start = time.time()
    results, console = run_trainer(model_dir, flags)
    results["process_seconds"] = time.time() - start
    results["pretrained"] = next((line for line in console.splitlines()
                                  if line.startswith("pretrained: ")), None)
    return results


def compare(work_dir: str, *, donor_steps: int, target_steps: int, train_per_class: int,
            seeds: list[int], extra_flags: list[str], digits: str | None = None,
            log=print) -> dict:
    donor_data, target_data = make_datasets(work_dir, train_per_class, digits)
    runs = os.path.join(work_dir, "runs")
    donor_dir = os.path.join(runs, "donor")
    donor = train(donor_dir, [*COMMON_FLAGS, f"--data_dir={donor_data}",
                              f"--train_steps={donor_steps}", "--seed=0", *extra_flags])
    log(f"donor   ({len(DONOR_CLASSES)} classes, {donor_steps} steps): "
        f"test accuracy {donor['splits']['test']['accuracy']:.1%}")
    report = {"donor": {"steps": donor_steps, "splits": donor["splits"]},
              "target_train_per_class": train_per_class, "target_steps": target_steps,
              "scratch": [], "finetuned": []}
    for seed in seeds:
        for arm, arm_flags in (("scratch", []), ("finetuned", [f"--pretrained={donor_dir}"])):
            results = train(os.path.join(runs, f"{arm}-seed{seed}"),
                            [*COMMON_FLAGS, f"--data_dir={target_data}",
                             f"--train_steps={target_steps}", f"--seed={seed}", *arm_flags,
                             *extra_flags])
            splits = results["splits"]
            report[arm].append({"seed": seed, "valid_accuracy": splits["valid"]["accuracy"],
                                "test_accuracy": splits["test"]["accuracy"],
                                "test_loss": splits["test"]["loss"],
                                "pretrained": results["pretrained"]})
            log(f"{arm:9s} seed {seed}: valid accuracy {splits['valid']['accuracy']:.1%}, "
                f"test accuracy {splits['test']['accuracy']:.1%}, test loss "
                f"{splits['test']['loss']:.3f} ({results['process_seconds']:.0f} s)")
    for arm in ("scratch", "finetuned"):
        report[f"{arm}_mean_test_accuracy"] = (
            sum(r["test_accuracy"] for r in report[arm]) / len(report[arm]))
    log(f"mean test accuracy over {len(seeds)} seed(s), {len(TARGET_CLASSES)} classes, "
        f"{train_per_class} training images each, {target_steps} steps: "
        f"from scratch {report['scratch_mean_test_accuracy']:.1%}, fine-tuned "
        f"{report['finetuned_mean_test_accuracy']:.1%}")
    files.atomic_write_text(os.path.join(work_dir, "transfer.json"),
                            json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = OneLineErrorParser(prog="python -m bench.transfer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="runs/transfer", help="datasets, runs and "
                        "transfer.json go here (its runs are replaced)")
    parser.add_argument("--donor_steps", type=int, default=300)
    parser.add_argument("--target_steps", type=int, default=40)
    parser.add_argument("--train_per_class", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(own)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds}: a comma-separated list of integers")
    for name in ("donor_steps", "target_steps", "train_per_class"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)}: must be a positive integer")
    try:
        compare(args.work_dir, donor_steps=args.donor_steps, target_steps=args.target_steps,
                train_per_class=args.train_per_class, seeds=seeds, extra_flags=extra)
    except TrainerFailed as e:
        print(f"bench.transfer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
