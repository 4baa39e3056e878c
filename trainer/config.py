"""The run configuration: a frozen dataclass built from the flags (see trainer/flags.py).

Field names are the flag names. The defaults live here, once: trainer/flags.py takes each
flag's default from `Config`, and tests build a `Config(...)` without parsing any argv.

`Config` holds what the user asked for. `RunPlan` holds what follows from it once the replica
count and dataset size are known (global batch, learning rate, steps); both are written into
`model_dir` so that a run can be read, compared and resumed.
"""
from __future__ import annotations

import dataclasses
import json
import math

from data.pixels import DEFAULT_MAX_IMAGE_PIXELS

# --best_metric choices (split/value of an evaluation) and which way is better.
BEST_METRICS = {"valid/accuracy": "max", "valid/loss": "min", "valid/balanced_accuracy": "max"}


@dataclasses.dataclass(frozen=True)
class Config:
    # Data
    data_dir: str | None = None
    model_dir: str = ''
    image_size: int = 224
    cache_images: str = 'auto'  # auto, memory, disk or none (data/memory.py)
    cache_memory_fraction: float = 0.5  # of the available memory, for cache_images=auto/memory
    crop_min_area: float = 0.25
    eval_crop: float = 1.0  # evaluation pixels: 1 squash; F < 1 short side to size/F, centre crop
    random_flip: bool = True
    skip_unknown_classes: bool = False
    on_bad_file: str = 'skip'
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are bad files, not decoded
    # Model
    model: str = 'resnet50'
    fused_batchnorm: bool = True
    list_models: bool = False
    # Fine-tuning
    pretrained: str = ''  # "", "imagenet", a .keras/.weights.h5 file or a run's model_dir
    freeze_backbone_epochs: float = 0.0
    backbone_lr_multiplier: float = 1.0
    # Batch and optimisation
    batch_size: int = 64
    scale_batch: bool = False
    optimizer: str = 'adam'
    base_lr: float = 0.001
    scale_lr: bool = False
    warmup_epochs: float = 1.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip_grad_norm: float = 0.0
    grad_accum_steps: int = 1
    # Training recipes
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0
    randaugment: str = ''  # "N,M" or "" (see parse_randaugment)
    # Duration: train_steps overrides epochs when set (> 0).
    epochs: float = 10.0
    train_steps: int = 0
    steps_per_loop: int = 50
    # Distribution and numerics
    distribution_strategy: str = 'mirrored'
    collective_timeout: float = 300.0  # seconds a worker waits on its peers before giving up
    cpu_devices: int = 0
    mixed_precision: str = 'none'
    xla: bool = False
    seed: int = 0
    deterministic: bool = False
    data_cache_dir: str = 'dataset'
    s3_anon: bool = False
    s3_endpoint_url: str | None = None
    s3_delete_removed: bool = False  # the sync deletes local files no longer in the bucket
    data_service: str = ''  # grpc://HOST:PORT of a tf.data service dispatcher, or ""
    data_service_timeout: float = 120.0  # seconds without a batch from the service: stop (75)
    synthetic_data: bool = False
    synthetic_classes: int = 1000
    export_at_end: bool = True
    # Outer loop cadence (0 = only at the end)
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    eval_batch_size: int = 0
    # Which checkpoint is best, when to stop, what the export returns
    best_metric: str = 'valid/accuracy'  # a key of BEST_METRICS above
    early_stopping_patience: int = 0  # valid evaluations without improvement; 0 = off
    # From when evaluations count against the patience: warmup (its end), N steps, Xepochs, or
    # a fraction F < 1 of the run (see parse_early_stopping_start)
    early_stopping_start: str = 'warmup'
    class_weight: str = 'none'  # none | balanced (loss weights from the train class counts)
    balanced_sampling: bool = False  # each epoch draws classes evenly (data/orders.py)
    unknown_below: float = 0.0  # the export names a top-1 probability below this `unknown`
    # TensorBoard extras
    eval_figures: bool = True
    sample_images: bool = True  # the nine training images before and after augmentation
    high_loss_scan: int = 2048  # train images scanned for the highest-loss gallery; 0 = off
    summary_histograms: bool = False
    profile_steps: str = ''  # "A,B" or "" (see parse_profile_steps)
    # Recovery and resume
    on_nan: str = 'stop'  # stop | rollback (see trainer/loop/actions.py)
    allow_change: str = ''  # FLAG[,FLAG...] that may differ from the run's saved config
    debug_nan_batches: str = ''  # data positions whose loss is made NaN (tests of --on_nan)
    debug_record_batches: bool = False  # write each step's image ids to batch_ids.tsv

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """"A,B" -> (A, B) with 1 <= A <= B; "" -> None; anything else raises ValueError."""
    if not text.strip():
        return None
    parts = [int(part) for part in text.split(",")]  # ValueError on non-integers
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ValueError(f"not A,B with 1 <= A <= B: {text!r}")
    return parts[0], parts[1]


def parse_randaugment(text: str) -> tuple[int, float] | None:
    """"N,M" -> (N, M) with N >= 1 and 0 <= M <= 10; "" -> None; else ValueError."""
    if not text.strip():
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"not N,M: {text!r}")
    num_ops, magnitude = int(parts[0]), float(parts[1])
    if num_ops < 1 or not 0 <= magnitude <= 10:
        raise ValueError(f"not N >= 1 and 0 <= M <= 10: {text!r}")
    return num_ops, magnitude


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """A length given in epochs (fractions allowed: --warmup_epochs, --freeze_backbone_epochs,
    --early_stopping_start=Xepochs) in whole steps."""
    return int(round(epochs * steps_per_epoch))


def parse_early_stopping_start(text: str) -> tuple[str, float]:
    """--early_stopping_start: "warmup" -> ("warmup", 0); "N" or "Nsteps" -> ("steps", N);
    "Xepochs" (fractions allowed, like --epochs) -> ("epochs", X); "F" with a decimal point and
    0 <= F < 1 -> ("fraction", F) of the run's steps; anything else raises ValueError."""
    value = text.strip().lower()
    if value == "warmup":
        return "warmup", 0.0
    if value.isdigit() or (value.endswith("steps") and value[:-len("steps")].isdigit()):
        return "steps", float(int(value.removesuffix("steps")))
    if value.endswith("epochs"):
        epochs = float(value[:-len("epochs")])  # ValueError on non-numbers
        if not 0 <= epochs < math.inf:
            raise ValueError(f"not a number of epochs >= 0: {text!r}")
        return "epochs", epochs
    fraction = float(value)  # ValueError on non-numbers
    if "." not in value or not 0 <= fraction < 1:
        raise ValueError(f"not a fraction 0 <= F < 1: {text!r}")
    return "fraction", fraction


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Derived numbers of a run; computed once the strategy and dataset are known."""
    num_replicas: int
    global_batch_size: int
    eval_global_batch_size: int
    learning_rate: float
    num_train_images: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    # After a run is extended (--allow_change=epochs on resume) the learning rate continues
    # from `decay_from_lr` at `decay_from_step` and decays on a cosine to 0 at the new end,
    # instead of jumping to where the longer cosine would be (see optimization.py).
    decay_from_step: int = 0
    decay_from_lr: float = 0.0
    precision: str = ""  # --mixed_precision resolved for this hardware, and why
    # --cache_images resolved for this start (data/memory.py): where decoded training images
    # live, whether the evaluation splits are kept decoded, and the start-up line saying why.
    cache_images: str = ""
    eval_cache: str = ""
    cache: str = ""

    @classmethod
    def make(cls, config: Config, num_replicas: int, num_train_images: int) -> "RunPlan":
        global_batch = config.batch_size * (num_replicas if config.scale_batch else 1)
        eval_batch = config.eval_batch_size or global_batch
        steps_per_epoch = num_train_images // global_batch
        if config.train_steps > 0:
            total_steps = config.train_steps
        else:
            total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
        learning_rate = config.base_lr * (num_replicas if config.scale_lr else 1)
        warmup = min(epochs_to_steps(config.warmup_epochs, steps_per_epoch), total_steps // 2)
        from trainer.loop.precision import resolve_precision  # (TensorFlow: loaded by now)
        return cls(num_replicas, global_batch, eval_batch, learning_rate, num_train_images,
                   steps_per_epoch, total_steps, warmup,
                   precision=resolve_precision(config.mixed_precision).describe())

    @classmethod
    def from_dict(cls, values: dict) -> "RunPlan":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def early_stopping_start(self, text: str) -> int:
        """The first step whose valid evaluation counts against --early_stopping_patience."""
        kind, value = parse_early_stopping_start(text)
        if kind == "warmup":
            return self.warmup_steps
        if kind == "epochs":
            return epochs_to_steps(value, self.steps_per_epoch)
        return int(value) if kind == "steps" else int(round(value * self.total_steps))
