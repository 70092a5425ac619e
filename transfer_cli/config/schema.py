"""Typed schema of every config group, registered in Hydra's ConfigStore.

The YAML files under configs/ only choose values; these dataclasses say which keys exist and their types, so a
mistyped key or a wrong type fails when the config is composed, before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class DataConfig:
    source: str = "imagefolder"  # imagefolder | csv | elpv
    root: Optional[str] = None  # imagefolder: root/{train,val[,test]}/<class>/*.jpg, or root/<class>/*.jpg
    csv: Optional[str] = None  # csv: manifest with columns path,label[,split]; paths relative to the CSV
    elpv_task: str = "binary"  # elpv: binary (defect probability >= 0.5) | four_class
    elpv_cell_type: str = "all"  # elpv: all | mono | poly
    val_fraction: float = 0.2  # used when the source has no validation split of its own
    test_fraction: float = 0.0
    split_seed: int = 0  # fixed apart from `seed`, so several training seeds share one split
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: Any = "auto"  # auto: one per available core but one, up to 8; or a number
    max_bad_images: int = 10  # unreadable images skipped (and listed in the run dir) before the run fails
    # Preprocessing; None = the backbone's pretrained config (timm resolve_data_config).
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # any timm model name, e.g. convnext_tiny, vit_base_patch16_224.augreg_in21k
    pretrained: bool = True  # timm hub weights
    weights: Optional[str] = None  # a state-dict file (.pth/.pt/.bin/.safetensors/.ckpt) or a named source
    head_hidden_dim: int = 0  # 0: a linear head; >0: Linear-ReLU-Dropout-Linear
    head_dropout: float = 0.0
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (drop_path_rate, ...)


@dataclass
class TransferConfig:
    mode: str = "feature_extract"  # feature_extract | fine_tune
    backbone_lr_scale: float = 1.0  # the backbone's LR = optimizer.lr x this
    cache_features: str = "auto"  # auto | true | false: train the head on precomputed features of a frozen backbone


@dataclass
class AugmentationConfig:
    name: str = "light"  # none | light
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop area range
    ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5
    vflip: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05  # never applied to biases and normalization weights
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | step | exponential | none
    warmup_epochs: float = 0.0  # linear warmup from warmup_start_factor x lr, stepped per batch
    warmup_start_factor: float = 0.0
    min_lr_factor: float = 0.0  # cosine floor, as a fraction of lr
    step_epochs: int = 10  # step: decay every this many epochs
    gamma: float = 0.1  # step: factor per decay; exponential: factor per epoch


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    max_epochs: int = 10
    min_epochs: Optional[int] = None
    deterministic: bool = False
    benchmark: Optional[bool] = None
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    val_check_interval: Optional[float] = None
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    limit_test_batches: Optional[float] = None
    fast_dev_run: Any = False
    overfit_batches: float = 0.0
    num_sanity_val_steps: Optional[int] = None
    enable_progress_bar: bool = True
    kwargs: Dict[str, Any] = field(default_factory=dict)  # any other pl.Trainer argument: +trainer.kwargs.X=...


@dataclass
class LoggerConfig:
    csv: bool = True  # metrics.csv in the run dir
    tensorboard: bool = False  # tb/ in the run dir (needs the tensorboard package)


@dataclass
class CallbacksConfig:
    monitor: str = "val/acc"
    mode: str = "max"
    save_last: bool = True
    early_stopping_patience: int = 0  # 0: off
    rich_progress: bool = True


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    name: str = "default"  # the run dir is outputs/<name>/<date>_<time>
    seed: int = 42
    task: str = "multiclass"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# Allowed values of the string "choice" fields, checked after composition (OmegaConf has no Literal type).
CHOICES: Dict[str, List[str]] = {
    "data.source": ["imagefolder", "csv", "elpv"],
    "data.elpv_task": ["binary", "four_class"],
    "data.elpv_cell_type": ["all", "mono", "poly"],
    "transfer.mode": ["feature_extract", "fine_tune"],
    "transfer.cache_features": ["auto", "true", "false"],
    "augmentation.name": ["none", "light"],
    "optimizer.name": ["adamw", "sgd"],
    "scheduler.name": ["cosine", "step", "exponential", "none"],
    "callbacks.mode": ["max", "min"],
    "task": ["multiclass"],
}

SCHEMA_NAME = "train_schema"


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


__all__ = ["TrainConfig", "CHOICES", "register_configs", "MISSING"]
