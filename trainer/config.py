"""The run configuration: a frozen dataclass built from the flags (see trainer/flags.py).

Field names are the flag names; defaults and help live with the flags only.

`Config` holds what the user asked for. `RunPlan` holds what follows from it once the replica
count and dataset size are known (global batch, learning rate, steps); both are written into
`model_dir` so that a run can be read, compared and resumed.
"""
from __future__ import annotations

import dataclasses
import json
import math


@dataclasses.dataclass(frozen=True)
class Config:
    # Data
    data_dir: str
    model_dir: str
    image_size: int
    cache_images: str  # memory, disk or none
    crop_min_area: float
    random_flip: bool
    skip_unknown_classes: bool
    on_bad_file: str
    # Model
    model: str
    list_models: bool
    # Fine-tuning
    pretrained: str  # "", "imagenet", a .keras/.weights.h5 file or a run's model_dir
    freeze_backbone_epochs: float
    backbone_lr_multiplier: float
    # Batch and optimisation
    batch_size: int
    scale_batch: bool
    optimizer: str
    base_lr: float
    scale_lr: bool
    warmup_epochs: float
    weight_decay: float
    momentum: float
    clip_grad_norm: float
    grad_accum_steps: int
    # Training recipes
    label_smoothing: float
    mixup_alpha: float
    cutmix_alpha: float
    ema_decay: float
    randaugment: str  # "N,M" or "" (see parse_randaugment)
    # Duration: train_steps overrides epochs when set (> 0).
    epochs: float
    train_steps: int
    steps_per_loop: int
    # Distribution and numerics
    distribution_strategy: str
    cpu_devices: int
    mixed_precision: str
    xla: bool
    seed: int
    deterministic: bool
    data_cache_dir: str
    s3_anon: bool
    s3_endpoint_url: str | None
    data_service: str  # grpc://HOST:PORT of a tf.data service dispatcher, or ""
    synthetic_data: bool
    synthetic_classes: int
    export_at_end: bool
    # Outer loop cadence (0 = only at the end)
    eval_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    eval_batch_size: int
    # TensorBoard extras
    eval_figures: bool
    summary_histograms: bool
    profile_steps: str  # "A,B" or "" (see parse_profile_steps)

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
        warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps // 2)
        return cls(num_replicas, global_batch, eval_batch, learning_rate, num_train_images,
                   steps_per_epoch, total_steps, warmup)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
