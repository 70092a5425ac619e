"""Typed schema of every config group, registered in Hydra's ConfigStore.

The YAML files under configs/ only choose values; these dataclasses say which keys exist, their types and their
defaults (a default lives here and nowhere else), so a mistyped key or a wrong type fails when the config is
composed, before anything heavy is imported. After composition a run's config becomes an instance of
`TrainConfig` (config/compose.py `as_schema`): plain, typed Python values, which is what the assembly layer reads.
The names a choice field allows are in config/choices.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

@dataclass(frozen=True)
class DataConfig:
    source: str = "imagefolder"  # imagefolder | csv | elpv
    root: Optional[str] = None  # imagefolder: root/{train,val[,test]}/<class>/*.jpg, or root/<class>/*.jpg
    csv: Optional[str] = None  # csv: manifest with columns path,label[,split]; paths relative to the CSV
    label_sep: str = ";"  # csv with task=multilabel: separates the labels of one image ("cat;dog"; empty = none)
    elpv_task: str = "binary"  # elpv: binary (defect probability >= 0.5) | four_class
    elpv_cell_type: str = "all"  # elpv: all | mono | poly
    val_fraction: float = 0.2  # used when the source has no validation split of its own
    test_fraction: float = 0.0
    split_seed: int = 0  # fixed apart from `seed`, so several training seeds share one split
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: Any = "auto"  # auto: one per available core but one; or a number
    decode: str = "cpu"  # cpu: workers decode and transform | gpu: workers read JPEG bytes, the GPU decodes (nvJPEG)
    sampler: str = "shuffle"  # shuffle: each image once per epoch | balanced: classes drawn equally often
    class_weights: str = "none"  # none | auto: the loss weights each class by its inverse train frequency
    max_bad_images: int = 10  # unreadable images skipped (and listed in the run dir) before the run fails
    # Preprocessing; None = the backbone's pretrained config (timm resolve_data_config).
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # any timm model name, e.g. convnext_tiny, vit_base_patch16_224.augreg_in21k
    pretrained: bool = True  # timm hub weights
    weights: Optional[str] = None  # a state-dict file (.pth/.pt/.bin/.safetensors/.ckpt) or a named source
    # Feature combination: the head reads the concatenated pooled features of several backbones (model.weights
    # then belongs to the first; the others follow model.pretrained) and/or of several feature levels of each
    # (timm out_indices, negative from the end). Empty: the backbone's usual pooled features.
    backbones: List[str] = field(default_factory=list)
    feature_stages: List[int] = field(default_factory=list)
    head_hidden_dim: int = 0  # 0: a linear head; >0: Linear-ReLU-Dropout-Linear
    head_dropout: float = 0.0
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (drop_path_rate, ...)
    drop_rate: Optional[float] = None  # timm's dropout before the classifier (None: the model's default)
    drop_path_rate: Optional[float] = None  # timm's stochastic depth (None: the model's default)


@dataclass(frozen=True)
class TransferConfig:
    mode: str = "feature_extract"  # feature_extract | fine_tune | partial | gradual_unfreeze
    freeze_stages: int = 0  # freeze the stem + the first N stages (timm's grouping; see audit.json), any mode
    freeze: List[str] = field(default_factory=list)  # and parameters matching these regexes
    # gradual_unfreeze: {epoch: stages} thawed at that epoch, e.g. {0: head, 2: [stage-1], 4: all}; a value may
    # also be {stages: [...], lr_scale: 0.5}. Stage refs: stem, stage3, stage-1 (the last), all, head.
    unfreeze: Any = None
    unfreeze_every: int = 1  # gradual_unfreeze without `unfreeze`: one more stage from the top every N epochs
    backbone_lr_scale: float = 1.0  # the backbone's LR = optimizer.lr x this
    layer_decay: Optional[float] = None  # layer-wise LR decay: the last stage x d, the one before x d^2, ...
    bn: str = "frozen"  # frozen: BatchNorm of frozen stages in eval mode (running stats fixed) | train
    cache_features: str = "auto"  # auto | true | false: train the head on precomputed features of a frozen backbone
    cache_views: int = 0  # >0: cache this many augmented views of each training image; epoch e uses view e % K
    # Where cached features persist between runs, keyed by a fingerprint of everything that shapes them; null:
    # in memory, for this run only.
    cache_dir: Optional[str] = "${oc.env:TRANSFER_CACHE_DIR,'~/.cache/transfer'}/features"
    # How a head on cached features is fitted. lbfgs: solved to convergence (full-batch L-BFGS, its L2 strength
    # chosen on val; training/probe.py) in one pass; sgd: the epoch loop of optimizer/scheduler/trainer.max_epochs;
    # auto: lbfgs where it applies (cached features, a linear head, no dropout, label smoothing or EMA), else sgd.
    head_solver: str = "auto"
    # The head a fit starts from. probe: the converged linear probe on the frozen backbone's eval-mode features of
    # the training images (LP-FT, Kumar et al. 2022), for fine_tune, partial and gradual_unfreeze; random: timm's init.
    head_init: str = "random"


@dataclass(frozen=True)
class AugmentationConfig:
    # The preset: none | light | medium | randaugment | trivialaugment | autoaugment. The knobs below apply to
    # every preset but none (which is the evaluation preprocessing); 0 turns a knob off.
    name: str = "light"
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop area range
    ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5  # probabilities
    vflip: float = 0.0
    rot90: float = 0.0  # probability of a 90/180/270 degree turn (0.75: the four orientations equally likely)
    color_jitter: float = 0.0  # brightness, contrast and saturation strength (medium: 0.3)
    rotation: float = 0.0  # max degrees of a random rotation (medium: 10)
    perspective: float = 0.0  # distortion scale of a random perspective, applied half the time (medium: 0.1)
    noise_std: float = 0.0  # Gaussian noise sigma, in [0, 1] pixel units (medium: 0.02)
    num_ops: int = 2  # randaugment: ops per image
    magnitude: int = 9  # randaugment: their strength, 0-30
    random_erasing: float = 0.0  # probability of erasing a random rectangle (to the mean colour)
    # Batch mixing (timm Mixup; images only, not cached features) and the loss's label smoothing.
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weights; 0: off
    cutmix_alpha: float = 0.0  # 0: off; with both on, each batch picks one (switch_prob: CutMix's share)
    mix_prob: float = 1.0  # fraction of batches mixed
    switch_prob: float = 0.5
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # sgd | adamw | adam | rmsprop | lamb | lion
    timm_opt: Optional[str] = None  # any other timm optimizer (timm.optim.list_optimizers()); wins over name
    lr: float = 1e-3
    weight_decay: float = 0.05  # never applied to biases and normalization weights
    momentum: float = 0.9  # sgd, rmsprop
    nesterov: bool = True  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, adam, lamb, lion
    eps: float = 1e-8  # adamw, adam, rmsprop, lamb
    kwargs: Dict[str, Any] = field(default_factory=dict)  # other optimizer arguments: +optimizer.kwargs.alpha=0.99


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "cosine"  # cosine | step | multistep | exponential | onecycle | plateau | constant (none: alias)
    warmup_epochs: float = 0.0  # linear warmup from warmup_start_factor x lr, stepped per optimizer step
    warmup_steps: int = 0  # the warmup in optimizer steps instead (set one of the two)
    warmup_start_factor: float = 0.0
    min_lr_factor: float = 0.0  # cosine, onecycle and plateau floor, as a fraction of lr
    step_epochs: int = 10  # step: decay every this many epochs
    milestones: List[int] = field(default_factory=list)  # multistep: the epochs at which the LR decays
    gamma: float = 0.1  # step, multistep, plateau: factor per decay; exponential: factor per epoch
    pct_start: float = 0.3  # onecycle: fraction of the run spent rising to lr (its own warmup)
    div_factor: float = 25.0  # onecycle: starts at lr / div_factor
    final_div_factor: float = 1e4  # onecycle: ends at lr / (div_factor x final_div_factor)
    monitor: Optional[str] = None  # plateau: the metric watched (None: callbacks.monitor)
    mode: Optional[str] = None  # plateau: max | min, whether the metric should rise or fall (None: callbacks.mode)
    patience: int = 2  # plateau: epochs without improvement before the LR decays


# Schedules whose rise is their warmup: a linear warmup (warmup_epochs/steps) contradicts them.
OWN_WARMUP_SCHEDULES = ("onecycle",)


def linear_warmup(length: float, _root_: Any) -> float:
    """`${linear_warmup:1}`: how a recipe or an experiment asks for a linear warmup of `length` (epochs or steps,
    by the key it sets), so that it gives way to a scheduler with a rise of its own (onecycle) when the user picks
    one: the choice of a scheduler wins over a bundle's value that only made sense for the one it chose."""
    return 0 if str(_root_.scheduler.name) in OWN_WARMUP_SCHEDULES else length


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"  # ddp (trainer=ddp): one process per device; data.batch_size is per device
    num_nodes: int = 1
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | auto: bf16-mixed where the GPU has bfloat16
    max_epochs: int = 10
    min_epochs: Optional[int] = None
    deterministic: bool = False
    benchmark: Optional[bool] = None
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None  # norm (Lightning's default) | value
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
    # torch.compile the network (fine-tuning; the first steps are slower while it compiles): false | true (torch's
    # default mode) | default | reduce-overhead (CUDA graphs: small batches on a large GPU) | max-autotune
    compile: Any = False
    channels_last: bool = True  # NHWC images and conv weights: the fast layout of cuDNN and oneDNN convolutions
    auto_batch_size: bool = False  # before fit, the largest data.batch_size that fits (Lightning's Tuner)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # any other pl.Trainer argument: +trainer.kwargs.X=...


@dataclass(frozen=True)
class LoggerConfig:
    # Which trackers a run logs to; the logger group's options (logger=mlflow, logger=[csv,mlflow,wandb]) each switch
    # on the flag of their own name, logger=none switches all off. metrics.csv feeds curves.png and sweep summaries.
    csv: bool = True  # metrics.csv in the run dir
    tensorboard: bool = False  # tb/ in the run dir (needs the tensorboard package)
    mlflow: bool = False  # an MLflow run (pip install 'transfer-cli[mlflow]')
    wandb: bool = False  # a Weights & Biases run, offline unless WANDB_MODE says otherwise (transfer-cli[wandb])
    experiment: Optional[str] = None  # the MLflow experiment / W&B project; None: the run's `name`
    run_name: Optional[str] = None  # None: <name>/<run dir's name>
    # mlflow: where runs are stored; None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db
    tracking_uri: Optional[str] = None
    log_model: bool = False  # also upload the checkpoint the test scored (else the last one) to mlflow / wandb
    tags: Dict[str, str] = field(default_factory=dict)  # extra run tags: +logger.tags.team=vision
    # More Lightning loggers, each a _target_ node: +logger.extra.NAME._target_=module.Class (+ its arguments)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallbacksConfig:
    monitor: str = "val/acc"
    mode: str = "max"
    save_last: bool = True
    early_stopping_patience: int = 0  # 0: off
    rich_progress: bool = True
    ema: bool = False  # validate, test and save an exponential moving average of the weights (raw ones kept too)
    ema_decay: float = 0.999
    checkpoint_every_n_steps: int = 0  # >0: also refresh last.ckpt every N optimizer steps (long epochs); 0: off
    test_ckpt: str = "best"  # the weights the end-of-run test scores: best (picked on val) | last (final epoch)
    # More Lightning callbacks, each a _target_ node: +callbacks.extra.NAME._target_=module.Class (+ its arguments)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalConfig:
    tta: str = "none"  # test-time augmentation in validation and test: none | hflip | flips | multicrop (logits averaged)
    multicrop_fraction: float = 0.875  # multicrop: side of the four corner crops and the centre crop


@dataclass(frozen=True)
class TuneConfig:
    # `transfer tune`: an Optuna study of trainings, each sampling `params`; the objective is the run's best
    # callbacks.monitor (maximized for callbacks.mode=max). Set by hparams_search=<name> (configs/hparams_search/).
    n_trials: int = 20  # trials of the study in all: running the command again continues it up to this many
    # config key -> a range in Hydra's sweep grammar: interval(1e-4, 1e-2), tag(log, interval(...)), integers
    # int(interval(1, 8)), choice(a, b), range(1, 5); a config group too (optimizer: choice(adamw, sgd))
    params: Dict[str, str] = field(default_factory=dict)
    sampler: str = "tpe"  # tpe | random (seeded by `seed`)
    pruner: str = "median"  # median | hyperband | none: stop a trial whose monitor lags, judged after each epoch
    startup_trials: int = 5  # trials that run to the end before the pruner judges any
    warmup_epochs: int = 1  # epochs of each trial before it may be pruned
    study_name: Optional[str] = None  # None: the run's name
    dir: Optional[str] = None  # the study's folder (trials, optuna.db, summary); None: multirun/<name>/optuna_<study>
    storage: Optional[str] = None  # an Optuna storage URL; None: sqlite:///<dir>/optuna.db
    # journal | journal:<file>: Optuna's journal file (<dir>/optuna.journal), for workers on a shared file system
    workers: int = 1  # local worker processes on the study (one GPU each where there are GPUs); 1: this process
    heartbeat_s: int = 30  # a running trial records that its worker lives this often
    grace_s: int = 120  # a running trial with no heartbeat for this long is failed and its parameters run again


@dataclass(frozen=True)
class CalibrationConfig:
    # After training, per checkpoint (best.ckpt, last.ckpt), on the validation split only (none: skipped), stored
    # in the checkpoint and used by `transfer predict` and `transfer eval`; summary.json `calibration`.
    temperature: bool = True  # single-label tasks: fit one temperature dividing the logits (val NLL); multilabel: skipped
    # Two classes: the decision threshold on the positive class's probability, chosen on val for this criterion:
    # none (argmax) | balanced_accuracy | f1 | recall (the highest threshold whose val recall >= target_recall)
    threshold_criterion: str = "none"
    target_recall: float = 0.9
    positive_class: Optional[str] = None  # the class the threshold decides; None: the second class (index 1)
    bins: int = 15  # equal-width confidence bins of the ECE and reliability.png


@dataclass(frozen=True)
class PathsConfig:
    # The run dir: Hydra's run dir when `transfer train` runs; None in a config composed outside a Hydra run.
    output_dir: Optional[str] = "${hydra:runtime.output_dir}"


@dataclass(frozen=True)
class TrainConfig:
    name: str = "default"  # the run dir is outputs/<name>/<date>_<time>
    seed: int = 42
    task: str = "multiclass"  # multiclass: one class per image (softmax) | multilabel: a label set (sigmoid)
    multilabel_threshold: float = 0.5  # multilabel: a label is predicted when its sigmoid >= this (F1, predictions)
    resume: Optional[str] = None  # a run dir, its .ckpt, or last: continue that run (transfer_cli/resume)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


SCHEMA_NAME = "train_schema"


def structured_schema(schema: Optional[type] = None) -> Any:
    """The schema (TrainConfig, or one group's dataclass) as an OmegaConf node that composition may write to. The
    dataclasses are frozen, so that a resolved run config (config/resolve.py) cannot change under the code reading it; OmegaConf marks a frozen
    dataclass's nodes read-only, and composing (Hydra's overrides, merging a restored config) needs them writable.
    The node keeps its dataclass type, so keys and types are still checked."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def thaw(node: Any) -> None:
        OmegaConf.set_readonly(node, None)
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                thaw(child)

    node = OmegaConf.structured(schema or TrainConfig)
    thaw(node)
    return node


def register_configs() -> None:
    """The schema in Hydra's ConfigStore, and the resolvers the YAML files use."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=structured_schema())
    if not OmegaConf.has_resolver("linear_warmup"):
        OmegaConf.register_new_resolver("linear_warmup", linear_warmup)


__all__ = ["OWN_WARMUP_SCHEDULES", "TrainConfig", "linear_warmup", "register_configs", "structured_schema"]
