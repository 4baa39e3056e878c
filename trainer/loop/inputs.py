"""The run's data: the class list and checked files (or synthetic images), and the distributed
datasets built from them at a given data position."""
from __future__ import annotations

import dataclasses
import os


from data import check, decode, diskcache, fingerprint, layout, manifest, memory, service, source
from data.augment import Augment, Mix
from data.files import atomic_write_text
from data.spec import InputSpec
from trainer.config import Config, RunPlan, parse_randaugment
from trainer.errors import TrainingError
from trainer.loop import distribute, resume
from trainer.state import run_dir

# An "epoch" of --synthetic_data, which has no dataset to define one.
SYNTHETIC_EPOCH_IMAGES = 10_000


@dataclasses.dataclass
class Inputs:
    class_names: list[str]
    train: layout.SplitFiles
    eval_splits: dict[str, layout.SplitFiles]
    source: source.Source | None = None  # data.source.open_source(): the train and eval datasets
    fingerprint: dict | None = None  # data/fingerprint.py's record of the splits (None: synthetic)

    @property
    def synthetic(self) -> bool:
        return getattr(self.source, "kind", "") == "synthetic"

    @property
    def num_train_images(self) -> int:
        return SYNTHETIC_EPOCH_IMAGES if self.synthetic else len(self.train)


def _synthetic_inputs(config: Config) -> Inputs:
    names = [f"synthetic_{i:04d}" for i in range(config.synthetic_classes)]
    return Inputs(names, layout.SplitFiles("train", (), ()), {},
                  source=source.open_source(None, synthetic=True, num_classes=len(names)))


def read_inputs(config: Config, log) -> Inputs:
    """The class list (the run's classes.json when present: the train folders must match it)
    and the files of each split that pass the data check; with --synthetic_data, numbered
    classes, no files and random images."""
    if config.synthetic_data:
        return _synthetic_inputs(config)
    decode.set_max_pixels(config.max_image_pixels)  # the caches' and evaluations' decoders
    if manifest.is_packed(config.data_dir):
        return read_packed_inputs(config, log)
    found = layout.train_class_names(config.data_dir)
    saved_path = os.path.join(config.model_dir, run_dir.CLASSES_FILE)
    class_names = found
    if os.path.exists(saved_path):
        class_names = run_dir.read_json(saved_path)
        _check_same_classes(config, found, class_names)
    if config.cache_images == "memory":  # refused before the data check decodes anything
        _memory_cache_fits(config, layout.count_images(config.data_dir, "train"))
    # The data check (data/check.py): every image decoded once by the training decoder (cached),
    # only readable files kept, the report written to model_dir before anything can stop.
    scanned = check.scan(config.data_dir, class_names,
                         skip_unknown_classes=config.skip_unknown_classes,
                         on_bad_file=config.on_bad_file,
                         cache_path=check.default_cache_path(config.data_dir, config.model_dir),
                         log=log, max_image_pixels=config.max_image_pixels)
    report_path = scanned.report.write(config.model_dir)
    for warning in scanned.report.warnings:
        log(f"warning: {warning}")
    if scanned.report.errors:
        raise TrainingError(scanned.report.error_line(report_path))
    eval_splits = {split: files for split, files in scanned.splits.items() if split != "train"}
    return Inputs(class_names, scanned.splits["train"], eval_splits,
                  source=source.open_source(config.data_dir),
                  fingerprint=fingerprint.make_folder(config.data_dir, scanned.splits,
                                                      scanned.file_info))


def check_data_fingerprint(config: Config, data: Inputs, resuming: bool, log) -> None:
    """The splits' files against the run's data_fingerprint.json (data/fingerprint.py): kept at
    the first start; on a resume a difference is refused in one line naming each split and what
    changed, or accepted with --allow_change=data (one line; the record is then the new data)."""
    if data.fingerprint is None:
        return  # synthetic images: no files
    try:
        saved = fingerprint.read(config.model_dir)
    except fingerprint.FingerprintError as e:
        raise TrainingError(str(e)) from None
    if saved is not None and resuming:
        changes = fingerprint.differences(saved, data.fingerprint)
        if not changes:
            return
        what = "; ".join(changes)
        effect = resume.CHANGEABLE_INPUTS["data"]
        if "data" not in config.allow_change.split(","):
            raise TrainingError(
                f"--data_dir={config.data_dir}: {what} since the run began; pass "
                f"--allow_change=data to train on the data as it is now ({effect}), restore "
                f"the data, or use a new --model_dir")
        log(f"data changed since the run began (--allow_change=data): {what}; {effect}")
    os.makedirs(config.model_dir, exist_ok=True)
    fingerprint.write(config.model_dir, data.fingerprint)


def _check_same_classes(config: Config, found: list[str], saved: list[str]) -> None:
    if found != saved:
        raise TrainingError(
            f"the train classes of {config.data_dir!r} differ from the run in "
            f"{config.model_dir!r}: new {sorted(set(found) - set(saved)) or 'none'}, "
            f"missing {sorted(set(saved) - set(found)) or 'none'}")


def read_packed_inputs(config: Config, log) -> Inputs:
    """Packed data (data/pack.py): the shards are verified against the manifest, whose items
    passed the data check when packed; its report is copied into model_dir."""
    try:
        packed = source.open_source(config.data_dir, cache_dir=config.model_dir, log=log)
    except manifest.DataError as e:
        raise TrainingError(str(e)) from None
    class_names = packed.manifest.class_names
    saved_path = os.path.join(config.model_dir, run_dir.CLASSES_FILE)
    if os.path.exists(saved_path):
        _check_same_classes(config, class_names, run_dir.read_json(saved_path))
    for name in ("data_report.txt", "data_report.json"):
        if os.path.exists(os.path.join(config.data_dir, name)):
            with open(os.path.join(config.data_dir, name), encoding="utf-8") as f:
                atomic_write_text(os.path.join(config.model_dir, name), f.read())
    splits = packed.manifest.splits
    return Inputs(class_names, splits["train"],
                  {name: split for name, split in splits.items() if name != "train"},
                  source=packed, fingerprint=fingerprint.make_packed(packed.manifest))


def sync_from_s3(config: Config, log) -> str:
    """Sync --data_dir=s3://BUCKET/PREFIX into DATA_CACHE_DIR/BUCKET/PREFIX; returns that path.
    Incremental: a restart re-downloads nothing that is already complete."""
    from data import s3
    try:
        bucket, prefix = s3.parse_s3_url(config.data_dir)
    except ValueError as e:
        raise TrainingError(f"--data_dir: {e}") from None
    local = os.path.join(config.data_cache_dir, bucket, prefix)
    log(f"syncing {config.data_dir} to {local}")
    try:
        summary = s3.sync(config.data_dir, local, anon=config.s3_anon,
                          endpoint_url=config.s3_endpoint_url, progress=False, log=log,
                          delete_removed=config.s3_delete_removed)
    except s3.S3SyncError as e:
        # A complete local copy (the record of a sync that finished) needs no server: a
        # restart while S3 is down goes on with it; a first start, or a copy cut off, cannot.
        record = s3.read_sync_record(local, f"s3://{bucket}/{prefix}") if e.unreachable \
            else None
        if record is None:
            raise TrainingError(f"--data_dir: {e}") from None
        log(f"could not check S3 for changes: {e}; training on the local copy from "
            f"{record.get('finished', '?')} ({record.get('files', '?')} files in {local})")
        return local
    log(summary.describe())
    if not summary.ok:
        raise TrainingError(f"--data_dir: {summary.failed} file(s) of {config.data_dir} failed "
                            f"to download and {len(summary.refused)} were refused; run again to "
                            f"retry (complete files are kept)")
    return local


def choose_cache(config: Config, data: Inputs, num_pipelines: int,
                 pipeline_id: int) -> memory.CacheChoice:
    """--cache_images resolved for this run's data and this process's memory and disk
    (data/memory.py), before anything is decoded."""
    if data.synthetic:
        return memory.CacheChoice("none", "none", "cache: none (synthetic images)")
    modes, why_not = ("memory", "disk", "none"), ""
    if config.data_service:
        modes, why_not = ("none", "disk"), "the tf.data service workers decode the images"
    elif config.balanced_sampling:
        modes = data.source.balanced_cache_modes
        why_not = "balanced sampling reads images one by one, the disk cache reads blocks"
    cache_dir = config.data_cache_dir
    reusable = diskcache.existing_bytes(cache_dir, data.source.disk_cache_name(
        data.train, config.image_size, num_pipelines, pipeline_id))
    try:
        return memory.choose_cache(
            config.cache_images, num_train=len(data.train),
            num_eval=sum(len(files) for files in data.eval_splits.values()),
            image_size=config.image_size, memory=memory.available_memory(),
            memory_fraction=config.cache_memory_fraction,
            disk_free=memory.free_disk(cache_dir) + reusable, disk_share=1 / num_pipelines,
            modes=modes, why_not=why_not)
    except memory.CacheError as e:
        raise TrainingError(str(e)) from None


def _memory_cache_fits(config: Config, num_train: int) -> None:
    try:
        memory.choose_cache("memory", num_train=num_train, num_eval=0,
                            image_size=config.image_size, memory=memory.available_memory(),
                            memory_fraction=config.cache_memory_fraction, disk_free=0)
    except memory.CacheError as e:
        raise TrainingError(str(e)) from None


def train_augment(config: Config) -> Augment:
    return Augment(config.crop_min_area, config.random_flip, parse_randaugment(config.randaugment))


def input_spec(config: Config, plan: RunPlan, num_classes: int) -> InputSpec:
    """The run's datasets besides their items (data/spec.py): the flags and the plan's batches
    and cache choice, as plain values for data/."""
    return InputSpec(
        image_size=config.image_size, global_batch_size=plan.global_batch_size, seed=config.seed,
        augment=train_augment(config),
        mix=Mix(num_classes, config.mixup_alpha, config.cutmix_alpha),
        balanced=config.balanced_sampling, with_ids=config.debug_record_batches,
        cache=plan.cache_images, cache_dir=config.data_cache_dir,
        eval_global_batch_size=plan.eval_global_batch_size, eval_cache=plan.eval_cache,
        eval_crop=config.eval_crop)


def train_iterator(config: Config, plan: RunPlan, inputs: Inputs, strategy, position: int,
                   end_position: int, log=print):
    """An iterator over the distributed training batches of data positions [position,
    end_position): the very batches an uninterrupted run would see there."""
    spec = input_spec(config, plan, len(inputs.class_names))
    # --data_service: the same dataset, run by tf.data service workers (data/service.py);
    # random images are made where they are used, with nothing to decode.
    served = config.data_service and not inputs.synthetic

    def dataset_fn(context):
        dataset = inputs.source.train_dataset(inputs.train, spec, context, start_step=position,
                                              total_steps=end_position, log=log)
        return service.distribute(dataset, config.data_service) if served else dataset

    return iter(strategy.distribute_datasets_from_function(
        dataset_fn, distribute.input_options(strategy)))


def eval_dataset(config: Config, plan: RunPlan, inputs: Inputs, strategy, split: str):
    """The distributed dataset of `split`: every image exactly once (weight-0 padding)."""
    spec, files = input_spec(config, plan, len(inputs.class_names)), inputs.eval_splits[split]
    return strategy.distribute_datasets_from_function(
        lambda context: inputs.source.eval_dataset(files, spec, context))


def sample_images(config: Config, inputs: Inputs, augment: Augment):
    """The first nine training images of epoch 0 with `augment`: (uint8 images, class names)."""
    spec = InputSpec(config.image_size, min(9, len(inputs.train)), config.seed, augment,
                     cache="none")
    images, labels, _ = next(iter(inputs.source.train_dataset(inputs.train, spec,
                                                              total_steps=1)))
    return images.numpy(), [inputs.class_names[i] for i in labels.numpy()]


def check_plan(config: Config, plan: RunPlan) -> None:
    """Rules that need the replica count and the training set's size."""
    for name, batch in (("--batch_size", plan.global_batch_size),
                        ("--eval_batch_size", plan.eval_global_batch_size)):
        if batch % plan.num_replicas:
            raise TrainingError(f"{name}: global batch {batch} does not divide by "
                                f"{plan.num_replicas} replicas")
    per_replica = plan.global_batch_size // plan.num_replicas
    if per_replica % config.grad_accum_steps:
        raise TrainingError(f"--grad_accum_steps={config.grad_accum_steps}: the batch of "
                            f"{per_replica} per replica does not divide into "
                            f"{config.grad_accum_steps} micro-batches")
    if plan.steps_per_epoch < 1:
        raise TrainingError(f"--batch_size: global batch {plan.global_batch_size} is larger than "
                            f"the {plan.num_train_images} training images")

