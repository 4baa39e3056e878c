"""Build a bird-layout dataset of real photographs at any size, offline.

scikit-learn ships two colour photographs (a temple and a flower, 427x640). Each class is one
region of one photo; each image is a random crop of that region (position, scale, mirror), written
as JPEG. The images are real camera pixels, so JPEG decoding, resizing and the model see realistic
data at 224x224 and above: what benchmarks and resume-cost measurements need. It is not a
recognition benchmark.

`build` makes the small sets of the speed benchmarks (8 classes); `ensure_birds` the reference
job's size (bench/scale.py): the Kaggle birds layout, 525 classes x 160 train + 5 valid + 5 test
JPEGs at 224x224 (84,000 / 2,625 / 2,625), or a `scale` fraction of the images per class.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
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


# ============================================================================================
# The reference job's size: 525 bird-like classes (bench/scale.py)
# ============================================================================================
BIRDS_CLASSES = 525
BIRDS_PER_CLASS = {"train": 160, "valid": 5, "test": 5}
BIRDS_VERSION = 1  # bump when the pixels or names change: a set built before is then rebuilt
BIRDS_MARKER = ".complete"
# 21 x 25 = 525 names in the style of the Kaggle set (upper case, some with two words).
_DESCRIPTORS = ("ABBOTTS", "AFRICAN", "AMERICAN", "ASIAN", "BLACK THROATED", "BLUE", "COMMON",
                "CRESTED", "EASTERN", "GOLDEN", "GREAT", "GREY HEADED", "LESSER", "LONG TAILED",
                "NORTHERN", "RED BEARDED", "RUFOUS", "SPOTTED", "WESTERN", "WHITE BROWED",
                "YELLOW BELLIED")
_NOUNS = ("BABBLER", "BEE EATER", "BULBUL", "BUNTING", "CRANE", "CUCKOO", "EAGLE", "FINCH",
          "FLYCATCHER", "HERON", "HORNBILL", "IBIS", "KINGFISHER", "LARK", "MYNA", "ORIOLE", "OWL",
          "PARROT", "PIGEON", "PITTA", "ROBIN", "SPARROW", "SUNBIRD", "TANAGER", "WARBLER")


def birds_class_name(label: int) -> str:
    """Class `label`'s folder name: distinct for every label < 525, and distinct after the
    layout's folding (whitespace runs, case). Every 25th has a double space, as some of the real
    set's folder names do."""
    descriptor = _DESCRIPTORS[label // len(_NOUNS) % len(_DESCRIPTORS)]
    noun = _NOUNS[label % len(_NOUNS)]
    return f"{descriptor}{'  ' if label % 25 == 7 else ' '}{noun}"


def birds_spec(scale: float = 1.0, classes: int = BIRDS_CLASSES, image_size: int = 224,
               seed: int = 0) -> dict:
    """What a birds set of this size holds: the marker's content. `scale` multiplies the images
    per class (at least one per split); the class count stays (525 unless `classes` says)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], not {scale}")
    if not 1 <= classes <= BIRDS_CLASSES:
        raise ValueError(f"classes must be 1..{BIRDS_CLASSES}, not {classes}")
    per_class = {split: max(1, round(n * scale)) for split, n in BIRDS_PER_CLASS.items()}
    return {"generator": f"data.photos birds v{BIRDS_VERSION}", "scale": scale,
            "classes": classes, "per_class": per_class, "image_size": image_size, "seed": seed,
            "counts": {split: n * classes for split, n in per_class.items()}}


def read_birds_marker(dest: str) -> dict | None:
    try:
        with open(os.path.join(dest, BIRDS_MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_PHOTOS = None


def _photos():
    global _PHOTOS
    if _PHOTOS is None:
        from sklearn.datasets import load_sample_images
        _PHOTOS = load_sample_images().images
    return _PHOTOS


def _class_look(rng, photo_image, photo_shape, size: int):
    """One class's look: a square region of one photo (x0, y0, side) whose crops are textured
    (flat sky or blur all look alike to the data check's near-duplicate hash: a region is drawn
    again unless 8 of 10 trial crops have MIN_TEXTURE_BITS), an orientation (one of 8) and a
    colour (channel order and gains)."""
    height, width = photo_shape[:2]
    for _ in range(50):
        side = int(rng.uniform(0.3, 0.6) * min(height, width))
        region = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)),
                  side)
        textured = sum(bin(_difference_hash(_crop(rng, photo_image, photo_shape, region, size))
                           ).count("1") >= MIN_TEXTURE_BITS for _ in range(10))
        if textured >= 8:
            break
    return (region, int(rng.integers(0, 8)), rng.permutation(3),
            rng.uniform(0.6, 1.4, 3).astype(np.float32))


def _crop(rng, photo_image, photo_shape, region, size: int):
    """One image of a class: a square of 0.5-1x the region's side around a point of the region,
    turned by up to 25 degrees, resampled once to size x size (a PIL affine transform)."""
    from PIL import Image
    height, width = photo_shape[:2]
    x0, y0, side = region
    angle = np.deg2rad(rng.uniform(-25, 25))
    cos, sin = np.cos(angle), np.sin(angle)
    crop_side = rng.uniform(0.5, 1.0) * side
    half = crop_side / 2 * (abs(cos) + abs(sin))  # the turned square's half extent
    half = min(half, width / 2 - 1, height / 2 - 1)
    crop_side = min(crop_side, 2 * half / (abs(cos) + abs(sin)))
    cx = np.clip(x0 + rng.uniform(0, side), half, width - half)
    cy = np.clip(y0 + rng.uniform(0, side), half, height - half)
    k = crop_side / size
    c = size / 2
    matrix = (k * cos, -k * sin, cx - k * (cos * c - sin * c),
              k * sin, k * cos, cy - k * (sin * c + cos * c))
    return photo_image.transform((size, size), Image.Transform.AFFINE, matrix,
                                 resample=Image.Resampling.BILINEAR)


# Images of a class are kept apart as the data check sees them (data/check.py: a difference
# hash of a 16x17 grey thumbnail, near duplicates <= 12 bits apart): a crop is drawn again when
# its hash has fewer than MIN_TEXTURE_BITS bits set (flat sky or blur, which all look alike) or
# lies within MIN_BITS_APART of an image already in the class. This hash is computed before JPEG
# encoding, hence the margin over the check's 12 bits.
MIN_TEXTURE_BITS = 48
MIN_BITS_APART = 16
MAX_DRAWS = 30


def _difference_hash(image) -> int:
    from PIL import Image
    small = np.asarray(image.convert("L").resize((17, 16), Image.Resampling.BOX), np.float32)
    bits = (small[:, 1:] > small[:, :-1] + 1.0).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _render(crop, orientation: int, channels, gains):
    from PIL import Image
    pixels = np.asarray(crop, np.float32)[:, :, channels] * gains
    pixels = np.rot90(pixels, orientation % 4)
    if orientation >= 4:
        pixels = pixels[:, ::-1]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_class(task) -> dict[str, int]:
    """All images of one class into staging/<split>/<name>/: a function of (seed, label) only,
    so the set is the same whatever the worker count."""
    staging, label, spec = task
    from PIL import Image
    rng = np.random.default_rng([spec["seed"], label])
    photo = _photos()[label % 2]
    photo_image = Image.fromarray(photo)
    size, counts, hashes = spec["image_size"], {}, []
    region, orientation, channels, gains = _class_look(rng, photo_image, photo.shape, size)
    for split, n in spec["per_class"].items():
        folder = os.path.join(staging, split, birds_class_name(label))
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            for _ in range(MAX_DRAWS):  # the last draw is kept whatever its hash
                image = _render(_crop(rng, photo_image, photo.shape, region, size), orientation,
                                channels, gains * rng.uniform(0.9, 1.1))
                value = _difference_hash(image)
                if bin(value).count("1") >= MIN_TEXTURE_BITS and all(
                        bin(value ^ other).count("1") >= MIN_BITS_APART for other in hashes):
                    break
            hashes.append(value)
            image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        counts[split] = n
    return counts


def ensure_birds(dest: str, *, scale: float = 1.0, classes: int = BIRDS_CLASSES,
                 image_size: int = 224, seed: int = 0, workers: int = 0, rebuild: bool = False,
                 log=print) -> tuple[dict, bool]:
    """The birds set at `dest`, built unless its marker matches; returns (spec, built).

    Built in a staging folder beside `dest` with `workers` processes (0: one per core), the
    marker `.complete` written last, then renamed to `dest`. A `dest` with a different marker is
    replaced only with `rebuild`; a `dest` without a marker is never touched (ValueError)."""
    spec = birds_spec(scale, classes, image_size, seed)
    found = read_birds_marker(dest)
    if found == spec:
        return spec, False
    if os.path.exists(dest):
        if found is None or not str(found.get("generator", "")).startswith("data.photos birds"):
            raise ValueError(f"{dest}: exists and is not a birds set built here (no matching "
                             f"{BIRDS_MARKER}); choose another folder")
        if not rebuild:
            raise ValueError(f"{dest}: holds a birds set of another size ({found.get('counts')}, "
                             f"{found.get('image_size')} px, {found.get('generator')}); pass "
                             f"--rebuild to replace it, or choose another folder")
    staging = files.staging_dir_for(dest, ".birds-")
    try:
        tasks = [(staging, label, spec) for label in range(classes)]
        workers = workers or min(len(tasks), os.cpu_count() or 1)
        log(f"birds: building {sum(spec['counts'].values())} JPEGs ({classes} classes, "
            f"{spec['per_class']} per class, {image_size} px) in {staging} with {workers} "
            f"processes")
        if workers == 1:
            done = list(map(_write_class, tasks))
        else:
            # fork: the workers need nothing re-imported (and a caller's script without a
            # __main__ guard is not run again in each worker, as it would be with spawn).
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                done = list(pool.imap_unordered(_write_class, tasks, chunksize=4))
        assert len(done) == classes
        with open(os.path.join(staging, BIRDS_MARKER), "w") as f:  # last: the set is whole
            json.dump(spec, f, indent=1)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return spec, True


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
