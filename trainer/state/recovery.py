"""Checkpoints, the best checkpoint and exports that do not read: found at start, reported in one
line each, moved aside under a name that says why (never deleted).

A checkpoint "reads" when its index parses and every tensor it lists reads back whole
(TensorFlow checks each tensor's CRC32C): a missing or truncated index, a missing, short or
corrupt data file all fail, where a plain `tf.train.latest_checkpoint` says None (the run then
looked new) or the restore raised. `resume_point` tries the run's checkpoints newest first;
the bad ones are moved to `checkpoints/unreadable-ckpt-N-<why>` and the `checkpoint` state
file is rewritten to name the one that reads. If none reads nothing is moved and the start is
refused (NoReadableCheckpoint): the run is never taken for a new one.

Moved-aside names start with `unreadable-`, which neither CheckpointManager's clean-up (it
deletes `ckpt-N.index` and `ckpt-N.data-*`) nor BestCheckpoint's (`ckpt-*`) matches, and which
TF Serving does not take for an export version (not a number).
"""
from __future__ import annotations

import datetime
import json
import os
import re

from data.files import atomic_write_text, fsync_path
from trainer.state.run_dir import BEST_DIR, BEST_STATE_FILE, EXPORT_DIR, RESULTS_FILE, RunError

STATE_FILE = "checkpoint"  # CheckpointManager's state file
ASIDE_PREFIX = "unreadable-"
_CKPT_FILE = re.compile(r"^(ckpt-(\d+))\.(index|data-\d{5}-of-\d{5})$")


class NoReadableCheckpoint(RunError):
    """The run holds checkpoints and none of them reads; str() is one line."""


def checkpoint_problem(prefix: str) -> tuple[str, str] | None:
    """None if checkpoint `prefix` reads whole, else (slug, one-line reason)."""
    import tensorflow as tf
    directory, base = os.path.split(prefix)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    data = [n for n in names if n.startswith(base + ".data-")]
    if not os.path.exists(prefix + ".index"):
        return ("index-missing", f"its index {base}.index is missing") if data else \
            ("missing", "its files are missing")
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        return "index-unreadable", f"its index does not read ({_first_line(e)})"
    if not data:
        return "data-missing", f"its data file {base}.data-00000-of-00001 is missing"
    try:
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001
        text = _first_line(e)
        if "No such file" in text:
            return "data-missing", f"a data file is missing ({text})"
        return "data-unreadable", f"its data do not read: truncated or corrupt ({text})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else \
        type(error).__name__


def move_aside(directory: str, files: list[str], name: str) -> str:
    """Move `files` (names in `directory`) into a new folder directory/unreadable-<name>[-N];
    returns its path."""
    target, n = os.path.join(directory, ASIDE_PREFIX + name), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(directory, f"{ASIDE_PREFIX}{name}-{n}")
    os.makedirs(target)
    for file in files:
        os.replace(os.path.join(directory, file), os.path.join(target, file))
    fsync_path(target)
    fsync_path(directory)
    return target


def _files_of(directory: str, base: str) -> list[str]:
    return sorted(n for n in os.listdir(directory)
                  if n == base + ".index" or n.startswith(base + ".data-"))


def _on_disk(directory: str) -> list[str]:
    """ckpt-N prefixes with an index or data file in `directory`, oldest first."""
    found = {m.group(1): int(m.group(2)) for m in map(_CKPT_FILE.match, os.listdir(directory))
             if m}
    return sorted(found, key=found.get)


def _listed(directory: str, log, move: bool) -> tuple[list[str], dict]:
    """The checkpoints the state file lists (oldest first) and its fields; from the files on
    disk when it does not parse (then moved aside by the chief, with one line) or is missing
    (fields["published"] False: a save that never completed, or none)."""
    import tensorflow as tf
    path = os.path.join(directory, STATE_FILE)
    state = tf.train.get_checkpoint_state(directory) if os.path.exists(path) else None
    if state is not None and state.model_checkpoint_path:
        listed = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
        newest = os.path.basename(state.model_checkpoint_path)
        names = [n for n in listed if n != newest] + [newest]
        return names, {"times": dict(zip(listed, state.all_model_checkpoint_timestamps)),
                       "preserved": state.last_preserved_timestamp, "published": True}
    names, published = _on_disk(directory), os.path.exists(path)
    if published and names:
        where = move_aside(directory, [STATE_FILE], "checkpoint-state") if move else path
        log(f"checkpoints: {path} (CheckpointManager's state file) does not parse: "
            f"{'moved aside to ' + where if move else 'left to the chief'}; the checkpoints "
            f"are taken from their files ({', '.join(names)})")
    times = {n: max(os.path.getmtime(os.path.join(directory, f))
                    for f in _files_of(directory, n)) for n in names}
    return names, {"times": times, "preserved": min(times.values(), default=1.0) - 1.0,
                   "published": published}


def resume_point(directory: str, *, move: bool = True, log=print) -> str | None:
    """The prefix of the newest checkpoint in `directory` that reads (None: the folder holds no
    checkpoint). Newer ones that do not read are reported and, with `move` (the chief), moved
    aside and dropped from the rewritten state file. Raises NoReadableCheckpoint when
    checkpoints were published (a state file exists) and none reads; nothing is moved then.
    Without a state file, checkpoint files that do not read are what a kill left of the
    first save, which never completed: moved aside, and the run starts afresh."""
    if not os.path.isdir(directory):
        return None
    names, fields = _listed(directory, log, move)
    bad = []
    for name in reversed(names):
        problem = checkpoint_problem(os.path.join(directory, name))
        if problem is None:
            if bad and move:
                _set_aside(directory, bad, log)
                _write_state(directory, [n for n in names if n not in dict(bad)], fields)
            if bad:
                log(f"checkpoints: {name} is the newest that reads"
                    + ("" if move else " (the chief moves the others aside)"))
            return os.path.join(directory, name)
        bad.append((name, problem))
    if bad and fields["published"]:
        raise NoReadableCheckpoint(
            f"no checkpoint in {directory} reads: "
            f"{'; '.join(f'{n}: {why[1]}' for n, why in bad)}. Nothing was moved or written; "
            f"the run is not started again from step 0 over them: restore the files, or move "
            f"{directory} away to train the run from the beginning")
    if bad and move:
        _set_aside(directory, bad, log, "no checkpoint was ever published (no state file): "
                   "the run starts from step 0")
    return None


def _set_aside(directory: str, bad: list, log, then: str = "trying the one before it") -> None:
    for name, (slug, why) in bad:
        target = move_aside(directory, _files_of(directory, name), f"{name}-{slug}")
        log(f"checkpoint {name} does not restore: {why}; moved aside to {target} (kept, not "
            f"deleted); {then}")


def _write_state(directory: str, names: list[str], fields: dict) -> None:
    """The `checkpoint` state file naming `names` (oldest first; the last is the latest), in
    CheckpointManager's text format, written atomically."""
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{n}"' for n in names]
    times = fields["times"]
    if all(n in times for n in names):
        lines += [f"all_model_checkpoint_timestamps: {times[n]!r}" for n in names]
    if fields["preserved"] is not None:
        lines.append(f"last_preserved_timestamp: {fields['preserved']!r}")
    atomic_write_text(os.path.join(directory, STATE_FILE), "\n".join(lines) + "\n")


def check_best(model_dir: str, log=print) -> None:
    """The best checkpoint (checkpoints/best): if best.json does not parse or its checkpoint
    does not read, best.json and every ckpt-* file there are moved aside together, with one
    line (the next evaluation that beats the run's record writes a new best)."""
    directory = os.path.join(model_dir, BEST_DIR)
    state_path = os.path.join(directory, BEST_STATE_FILE)
    if not os.path.exists(state_path):
        return
    try:
        with open(state_path) as f:
            name = json.load(f)["checkpoint"]
        problem = checkpoint_problem(os.path.join(directory, name))
    except (ValueError, KeyError, TypeError) as e:
        name, problem = "best", ("state-unreadable", f"{BEST_STATE_FILE} does not parse ({e})")
    if problem is None:
        return
    files = [BEST_STATE_FILE] + sorted(n for n in os.listdir(directory) if n.startswith("ckpt-"))
    target = move_aside(directory, files, f"{name}-{problem[0]}")
    log(f"best checkpoint {name} does not restore: {problem[1]}; moved aside with "
        f"{BEST_STATE_FILE} to {target} (kept, not deleted); the next evaluation that beats "
        f"the run's best so far writes a new one")


def check_exports(model_dir: str, log=print) -> None:
    """Every export/<version>: a SavedModel without saved_model.pb or whose variables do not
    read is moved aside (one line). When results.json names it, results.json is moved aside
    too, so that this start finishes the run again and writes the export anew."""
    root = os.path.join(model_dir, EXPORT_DIR)
    if not os.path.isdir(root):
        return
    for version in sorted((v for v in os.listdir(root) if v.isdigit()), key=int):
        folder = os.path.join(root, version)
        problem = ("saved-model-missing", "its saved_model.pb is missing") \
            if not os.path.exists(os.path.join(folder, "saved_model.pb")) else \
            checkpoint_problem(os.path.join(folder, "variables", "variables"))
        if problem is None:
            continue
        target = move_aside(root, [version], f"{version}-{problem[0]}")
        log(f"export {folder} does not load: {problem[1].replace('its ', 'its variables: ', 1)}"
            f"; moved aside to {target} (kept, not deleted)")
        _unfinish(model_dir, version, log)


def _unfinish(model_dir: str, version: str, log) -> None:
    """Move results.json aside if it names export `version` (by its folder name: the path it
    holds is absolute, and the run folder may have moved since): the run finishes again."""
    path = os.path.join(model_dir, RESULTS_FILE)
    try:
        with open(path) as f:
            named = os.path.basename(os.path.normpath(json.load(f).get("export_dir") or "."))
    except (OSError, ValueError, AttributeError):
        return
    if named != version:
        return
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    target = os.path.join(model_dir, f"results.export-unreadable-{stamp}.json")
    os.replace(path, target)
    fsync_path(model_dir)
    log(f"{path} named that export: moved aside to {target}; this start finishes the run "
        f"again (final evaluation, model file, export, results)")

