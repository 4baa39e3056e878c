"""Build a bird-layout dataset of real photographs at any size, offline.

scikit-learn ships two colour photographs (a temple and a flower, 427x640). Each class is one
region of one photo; each image is a random crop of that region (position, scale, mirror), written
as JPEG. The images are real camera pixels, so JPEG decoding, resizing and the model see realistic
data at 224x224 and above: what benchmarks and resume-cost measurements need. It is not a
recognition benchmark.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from data import files


def build(dest: str, *, image_size: int = 224, num_classes: int = 8, per_class: int = 64,
          eval_per_class: int = 5, seed: int = 0) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    regions = []  # (photo index, x0, y0, width, height): a grid of 2x2 regions per photo
    for index, photo in enumerate(photos):
        height, width = photo.shape[:2]
        for gy in range(2):
            for gx in range(2):
                regions.append((index, gx * width // 2, gy * height // 2, width // 2, height // 2))
    counts = {"train": 0, "valid": 0, "test": 0}
    staging = files.staging_dir_for(dest, ".photos-")
    for label in range(num_classes):
        photo_index, x0, y0, w, h = regions[label % len(regions)]
        photo = photos[photo_index]
        class_name = f"REGION {label:02d}  {('TEMPLE', 'FLOWER')[photo_index]}"
        for split, n in (("train", per_class), ("valid", eval_per_class),
                         ("test", eval_per_class)):
            folder = os.path.join(staging, split, class_name)
            os.makedirs(folder)
            for i in range(n):
                side = int(rng.uniform(0.5, 1.0) * min(w, h))
                cx = x0 + int(rng.integers(0, w - side + 1))
                cy = y0 + int(rng.integers(0, h - side + 1))
                crop = Image.fromarray(photo[cy:cy + side, cx:cx + side]).resize(
                    (image_size, image_size), Image.Resampling.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
            counts[split] += n
    files.publish_staged_dataset(staging, dest, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.photos", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", required=True)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=8)
    parser.add_argument("--per_class", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.image_size, args.num_classes, args.per_class) < 1:
        parser.error("--image_size, --num_classes and --per_class must be >= 1")
    counts = build(args.dest, image_size=args.image_size, num_classes=args.num_classes,
                   per_class=args.per_class, seed=args.seed)
    print(f"photo dataset written to {args.dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
