"""Scan a dataset laid out as ``DATA_DIR/<split>/<CLASS NAME>/<image>``.

The folder name is the label. Labels are always assigned by name from the train split's class
list, never by position, so a split that lacks a class (or has an extra one) cannot shift labels.
Names that differ between splits only by whitespace or case are the same class.
"""
from __future__ import annotations

import dataclasses
import os

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp"})


class LayoutError(ValueError):
    """A dataset layout problem that stops training; str() is a one-line message."""


def class_key(name: str) -> str:
    """Names equal under this key are one class: whitespace runs folded, case ignored."""
    return " ".join(name.split()).casefold()


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    name: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    # (folder name in this split, name in train) for classes matched only after folding.
    renamed: tuple[tuple[str, str], ...] = ()
    # Class folders of this split with no counterpart in train (their images are not in `files`).
    unknown_classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_class_dirs(split_dir: str) -> list[str]:
    """Visible sub-folders of a split, sorted; files at the split root are ignored."""
    if not os.path.isdir(split_dir):
        raise LayoutError(f"split folder {split_dir!r} does not exist")
    names = sorted(
        entry.name for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise LayoutError(f"split folder {split_dir!r} holds no class folders")
    return names


def list_images(class_dir: str) -> list[str]:
    return sorted(
        os.path.join(class_dir, entry.name) for entry in os.scandir(class_dir)
        if entry.is_file() and is_image_file(entry.name)
    )


def count_images(data_dir: str, split: str) -> int:
    """Image files in a split's class folders, by name only (nothing is opened): the size of a
    split before the data check."""
    split_dir = os.path.join(data_dir, split)
    return sum(len(list_images(os.path.join(split_dir, folder)))
               for folder in list_class_dirs(split_dir))


def scan_split(data_dir: str, split: str, class_names: list[str] | tuple[str, ...],
               allow_unknown_classes: bool = False) -> SplitFiles:
    """Files and labels of one split, labelled by the train class list `class_names`."""
    split_dir = os.path.join(data_dir, split)
    label_by_key = {class_key(name): i for i, name in enumerate(class_names)}
    files, labels, renamed, unknown = [], [], [], []
    for folder in list_class_dirs(split_dir):
        label = label_by_key.get(class_key(folder))
        if label is None:
            unknown.append(folder)
            continue
        if folder != class_names[label]:
            renamed.append((folder, class_names[label]))
        for path in list_images(os.path.join(split_dir, folder)):
            files.append(path)
            labels.append(label)
    if unknown and not allow_unknown_classes:
        raise LayoutError(
            f"split {split!r} has class folder(s) not in train: {', '.join(map(repr, unknown))} "
            "(labels come from train; pass --skip_unknown_classes to leave those images out)")
    if not files:
        raise LayoutError(f"split {split!r} in {data_dir!r} holds no images")
    return SplitFiles(split, tuple(files), tuple(labels), tuple(renamed), tuple(unknown))


def train_class_names(data_dir: str) -> list[str]:
    """The class list of the train split: its folder names, sorted."""
    names = list_class_dirs(os.path.join(data_dir, "train"))
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(class_key(name), name)
        if other != name:
            raise LayoutError(
                f"train has two folders for one class: {other!r} and {name!r} "
                "(they differ only by whitespace or case)")
    return names
