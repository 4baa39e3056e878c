"""Build the embedded demo dataset: scikit-learn's handwritten digits written as JPEG files.

1,797 real 8x8 scans of digits (16 grey levels) are upscaled to 32x32 and saved as
``DEST/{train,valid,test}/<digit name>/*.jpg``, so the demo runs the same file-reading path as
a real dataset, with no network. The split is stratified and fixed by `seed`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

from data import files

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_FRACTIONS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))


def build(dest: str, image_size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write the dataset to `dest` (replaced atomically); returns images per split. An existing
    `dest` is replaced only when it is a dataset built here holding only the files written here
    (files.FolderError, one line, otherwise: nothing is deleted)."""
    files.check_replaceable(dest)
    staging = files.staging_dir_for(dest, ".demo-")
    try:
        counts = _write_images(staging, image_size, seed)
        files.publish_staged_dataset(staging, dest, counts)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def _write_images(staging: str, image_size: int, seed: int) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {name: 0 for name, _ in SPLIT_FRACTIONS}
    for label, class_name in enumerate(CLASS_NAMES):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_train = int(round(len(indices) * SPLIT_FRACTIONS[0][1]))
        n_valid = int(round(len(indices) * SPLIT_FRACTIONS[1][1]))
        parts = {"train": indices[:n_train], "valid": indices[n_train:n_train + n_valid],
                 "test": indices[n_train + n_valid:]}
        for split, split_indices in parts.items():
            folder = os.path.join(staging, split, class_name)
            os.makedirs(folder)
            for index in split_indices:
                pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize(
                    (image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
                image.save(os.path.join(folder, f"digit_{index:04d}.jpg"), quality=95)
            counts[split] += len(split_indices)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default="dataset/demo", help="output folder (a demo set built "
                        "here is replaced; a folder holding other files is refused)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = build(args.dest, args.image_size, args.seed)
    except files.FolderError as e:
        print(f"data.demo: {e}", file=sys.stderr)
        return 1
    print(f"demo dataset written to {args.dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
