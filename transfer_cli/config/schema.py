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

from transfer_cli.config.keys import key, key_reference

@dataclass(frozen=True)
class DataConfig:
    source: str = key("imagefolder", group="data", help="where the images and labels come from")
    root: Optional[str] = key(None, help='imagefolder: root/{train,val[,test]}/<class>/*.jpg, or root/<class>/*.jpg')
    csv: Optional[str] = key(None, help='csv: manifest with columns path,label[,split]; paths relative to the CSV')
    label_sep: str = key(";",
                         help='csv with task=multilabel: separates the labels of one image ("cat;dog"; empty = none)')
    elpv_task: str = key("binary", choices=('binary', 'four_class'),
                         help='elpv: binary (defect probability >= 0.5) or its four probability levels')
    elpv_cell_type: str = key("all", choices=('all', 'mono', 'poly'), help='elpv: the cells of all wafers, or only mono- or polycrystalline ones')
    val_fraction: float = key(0.2, within="[0, 1)", help='used when the source has no validation split of its own')
    test_fraction: float = key(0.0, within="[0, 1)", example=0.1)
    split_seed: int = key(0, help='fixed apart from `seed`, so several training seeds share one split')
    folds: int = key(0, within="[0, inf)", example=5,
                     help='k-fold cross-validation (transfer kfold): 0 off; k >= 2 deals the train and val samples '
                          'into k folds, stratified and seeded by split_seed (test held out as without folds)')
    fold: int = key(0, within="[0, inf)", help='with data.folds=k: the fold (0 ... k-1) that is val, the others train')
    batch_size: int = key(32, within="[1, inf)")
    eval_batch_size: Optional[int] = key(None, within="[1, inf)", example=64, resume=True,
                                         help='default: 2 x batch_size')
    num_workers: Any = key("auto", resume=True, help='auto: one per available core but one; or a number')
    decode: str = key("cpu", choices=('cpu', 'gpu'),
                      help='cpu: workers decode and transform | gpu: workers read JPEG bytes, the GPU decodes '
                           '(nvJPEG)')
    sampler: str = key("shuffle", choices=('shuffle', 'balanced'),
                       help='shuffle: each image once per epoch | balanced: classes drawn equally often')
    class_weights: str = key("none", choices=('none', 'auto'),
                             help='auto: the loss weights each class by its inverse train frequency')
    max_bad_images: int = key(10, within="[0, inf)",
                              help='unreadable images skipped (and listed in the run dir) before the run fails')
    # Preprocessing (role="preprocessing": a restored checkpoint's own unless overridden); None = the backbone's
    # pretrained config (timm resolve_data_config).
    image_size: Optional[int] = key(None, within="[1, inf)", example=224, role="preprocessing",
                                    help="the side of the network's input, in pixels")
    crop_pct: Optional[float] = key(None, within="(0, 1]", example=0.875, role="preprocessing",
                                    help="evaluation: the centre crop's share of the resized image")
    interpolation: Optional[str] = key(None, role="preprocessing", help="bilinear | bicubic | nearest")
    mean: Optional[List[float]] = key(None, within="[0, 1]", example=0.5, role="preprocessing",
                                      help="per-channel normalization mean, in [0, 1] pixel units")
    std: Optional[List[float]] = key(None, within="(0, inf)", example=0.5, role="preprocessing",
                                     help="per-channel normalization std")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = key("resnet50", help='any timm model name, e.g. convnext_tiny, vit_base_patch16_224.augreg_in21k')
    pretrained: bool = key(True, help='timm hub weights')
    weights: Optional[str] = key(None, help='a state-dict file (.pth/.pt/.bin/.safetensors/.ckpt) or a named source')
    backbones: List[str] = key(factory=list,
                               help='Feature combination: the head reads the concatenated pooled features of several '
                                    'backbones (model.weights then belongs to the first; the others follow '
                                    'model.pretrained) and/or of several feature levels of each (timm out_indices, '
                                    "negative from the end). Empty: the backbone's usual pooled features.")
    feature_stages: List[int] = key(factory=list)
    head_hidden_dim: int = key(0, within="[0, inf)", help='0: a linear head; >0: Linear-ReLU-Dropout-Linear')
    head_dropout: float = key(0.0, within="[0, 1)", example=0.2)
    timm_kwargs: Dict[str, Any] = key(factory=dict, help='passed to timm.create_model (drop_path_rate, ...)')
    drop_rate: Optional[float] = key(None, within="[0, 1)", example=0.2,
                                     help="timm's dropout before the classifier (None: the model's default)")
    drop_path_rate: Optional[float] = key(None, within="[0, 1)", example=0.1,
                                          help="timm's stochastic depth (None: the model's default)")


@dataclass(frozen=True)
class TransferConfig:
    mode: str = key("feature_extract", group="transfer", help='which parameters train, and when (README: Transfer modes)')
    freeze_stages: int = key(0, within="[0, inf)", example=2,
                             help="freeze the stem + the first N stages (timm's grouping; see audit.json), any mode")
    freeze: List[str] = key(factory=list, help='and parameters matching these regexes')
    unfreeze: Any = key(None,
                        help='gradual_unfreeze: {epoch: stages} thawed at that epoch, e.g. {0: head, 2: [stage-1], 4:'
                             ' all}; a value may also be {stages: [...], lr_scale: 0.5}. Stage refs: stem, stage3, '
                             'stage-1 (the last), all, head.')
    unfreeze_every: int = key(1, within="[1, inf)",
                              help='gradual_unfreeze without `unfreeze`: one more stage from the top every N epochs')
    backbone_lr_scale: float = key(1.0, within="[0, inf)", example=0.1, help="the backbone's LR = optimizer.lr x this")
    layer_decay: Optional[float] = key(None, within="(0, 1]", example=0.75,
                                       help='layer-wise LR decay: the last stage x d, the one before x d^2, ...')
    bn: str = key("frozen", choices=('frozen', 'eval', 'train'),
                  help='frozen: BatchNorm of frozen stages in eval mode (running stats fixed) | eval: every '
                       "BatchNorm in eval mode, trained stages too (the pretrained statistics; LP-FT's probe fits "
                       'the network it starts) | train: every BatchNorm on batch statistics')
    cache_features: str = key("auto", choices=('auto', 'true', 'false'),
                              help='train the head on precomputed features of a frozen backbone')
    cache_views: int = key(0, within="[0, inf)",
                           help='>0: cache this many augmented views of each training image; epoch e uses view e % K')
    cache_dir: Optional[str] = key("${oc.env:TRANSFER_CACHE_DIR,'~/.cache/transfer'}/features", resume=True,
                                   help='Where cached features persist between runs, keyed by a fingerprint of '
                                        'everything that shapes them; null: in memory, for this run only.')
    head_solver: str = key("auto", choices=('auto', 'lbfgs', 'sgd'),
                           help='How a head on cached features is fitted. lbfgs: solved to convergence (full-batch '
                                'L-BFGS, its L2 strength chosen on val; training/probe.py) in one pass; sgd: the '
                                'epoch loop of optimizer/scheduler/trainer.max_epochs; auto: lbfgs where it applies '
                                '(cached features, a linear head, no dropout, label smoothing or EMA), else sgd.')
    head_init: str = key("random", choices=('random', 'probe'),
                         help="The head a fit starts from. probe: the converged linear probe on the frozen backbone's"
                              ' eval-mode features of the training images (LP-FT, Kumar et al. 2022), for fine_tune, '
                              "partial and gradual_unfreeze; random: timm's init.")
    # transfer=lora: low-rank adapters (the peft library) beside frozen backbone weights; merged on export.
    lora_rank: int = key(8, within="[1, inf)", example=4, help='lora: the rank r of each adapter (B A, B zero at init)')
    lora_alpha: int = key(16, within="[1, inf)", help="lora: the adapters' output is scaled by alpha / r")
    lora_dropout: float = key(0.0, within="[0, 1)", example=0.1, help="lora: dropout on the adapters' input")
    lora_targets: List[str] = key(factory=list,
                                  help="lora: regexes searched in the backbone's module names (blocks.0.attn.qkv; "
                                       'audit.json lists the adapted layers); empty: every Linear and ungrouped '
                                       'Conv2d outside the stem and the stages transfer.freeze_stages holds')


@dataclass(frozen=True)
class AugmentationConfig:
    # The preset: none | light | medium | randaugment | trivialaugment | autoaugment. The knobs below apply to
    # every preset but none (which is the evaluation preprocessing); 0 turns a knob off.
    name: str = key("light", group="augmentation")
    scale: List[float] = key(factory=lambda: [0.08, 1.0], help='random resized crop area range')
    ratio: List[float] = key(factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = key(0.5, within="[0, 1]", help='probabilities')
    vflip: float = key(0.0, within="[0, 1]", example=0.5)
    rot90: float = key(0.0, within="[0, 1]", example=0.5,
                       help='probability of a 90/180/270 degree turn (0.75: the four orientations equally likely)')
    color_jitter: float = key(0.0, within="[0, inf)", help='brightness, contrast and saturation strength (medium: 0.3)')
    rotation: float = key(0.0, within="[0, inf)", help='max degrees of a random rotation (medium: 10)')
    perspective: float = key(0.0, within="[0, 1]", example=0.5,
                             help='distortion scale of a random perspective, applied half the time (medium: 0.1)')
    noise_std: float = key(0.0, within="[0, inf)", help='Gaussian noise sigma, in [0, 1] pixel units (medium: 0.02)')
    num_ops: int = key(2, within="[0, inf)", example=0, help='randaugment: ops per image')
    magnitude: int = key(9, within="[0, 30]", help='randaugment: their strength, 0-30')
    random_erasing: float = key(0.0, within="[0, 1]", example=0.5,
                                help='probability of erasing a random rectangle (to the mean colour)')
    # Batch mixing (timm Mixup; images only, not cached features) and the loss's label smoothing.
    mixup_alpha: float = key(0.0, within="[0, inf)", help='Beta(alpha, alpha) mixing weights; 0: off')
    cutmix_alpha: float = key(0.0, within="[0, inf)",
                              help="0: off; with both on, each batch picks one (switch_prob: CutMix's share)")
    mix_prob: float = key(1.0, within="[0, 1]", example=0.5, help='fraction of batches mixed')
    switch_prob: float = key(0.5, within="[0, 1]")
    label_smoothing: float = key(0.0, within="[0, 1)", example=0.1)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = key("adamw", group="optimizer", help='the optimizer (timm_opt: any other of timm)')
    timm_opt: Optional[str] = key(None, help='any other timm optimizer (timm.optim.list_optimizers()); wins over name')
    lr: float = key(1e-3, within="(0, inf)")
    weight_decay: float = key(0.05, within="[0, inf)", help='never applied to biases and normalization weights')
    momentum: float = key(0.9, within="[0, 1)", help="sgd, rmsprop",
                          when=lambda cfg: cfg.optimizer.name in ("sgd", "rmsprop") and not cfg.optimizer.timm_opt)
    nesterov: bool = key(True, help='sgd')
    betas: List[float] = key(factory=lambda: [0.9, 0.999], within="[0, 1)", example=0.9, help='adamw, adam, lamb, lion')
    eps: float = key(1e-8, within="(0, inf)", help='adamw, adam, rmsprop, lamb')
    kwargs: Dict[str, Any] = key(factory=dict, help='other optimizer arguments: +optimizer.kwargs.alpha=0.99')


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = key("cosine", group="scheduler",
                    help='cosine | step | multistep | exponential | onecycle | plateau | constant (none: alias)')
    warmup_epochs: float = key(0.0, within="[0, inf)", example=1,
                               help='linear warmup from warmup_start_factor x lr, stepped per optimizer step')
    warmup_steps: int = key(0, within="[0, inf)", example=100,
                            help='the warmup in optimizer steps instead (set one of the two)')
    warmup_start_factor: float = key(0.0, within="[0, 1]")
    min_lr_factor: float = key(0.0, within="[0, 1]", help='cosine, onecycle and plateau floor, as a fraction of lr')
    step_epochs: int = key(10, within="[1, inf)", help='step: decay every this many epochs')
    milestones: List[int] = key(factory=list, within="[0, inf)", example=10,
                                help='multistep: the epochs at which the LR decays')
    gamma: float = key(0.1, within="(0, inf)",
                       help='step, multistep, plateau: factor per decay; exponential: factor per epoch')
    pct_start: float = key(0.3, within="(0, 1)",
                           help='onecycle: fraction of the run spent rising to lr (its own warmup)')
    div_factor: float = key(25.0, within="(0, inf)", help='onecycle: starts at lr / div_factor')
    final_div_factor: float = key(1e4, within="(0, inf)", help='onecycle: ends at lr / (div_factor x final_div_factor)')
    monitor: Optional[str] = key(None, help='plateau: the metric watched (None: callbacks.monitor)')
    mode: Optional[str] = key(None, choices=('max', 'min'),
                              help='plateau: max | min, whether the metric should rise or fall (None: callbacks.mode)')
    patience: int = key(2, within="[0, inf)", help='plateau: epochs without improvement before the LR decays')


# Schedules whose rise is their warmup: a linear warmup (warmup_epochs/steps) contradicts them.
OWN_WARMUP_SCHEDULES = ("onecycle",)


def linear_warmup(length: float, _root_: Any) -> float:
    """`${linear_warmup:1}`: how a recipe or an experiment asks for a linear warmup of `length` (epochs or steps,
    by the key it sets), so that it gives way to a scheduler with a rise of its own (onecycle) when the user picks
    one: the choice of a scheduler wins over a bundle's value that only made sense for the one it chose."""
    return 0 if str(_root_.scheduler.name) in OWN_WARMUP_SCHEDULES else length


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: str = key("auto", resume=True)
    devices: Any = key("auto")
    strategy: str = key("auto", help='ddp (trainer=ddp): one process per device; data.batch_size is per device')
    num_nodes: int = key(1, within="[1, inf)")
    precision: str = key("32-true",
                         help='32-true | bf16-mixed | 16-mixed | auto: bf16-mixed where the GPU has bfloat16')
    max_epochs: int = key(10, within="[1, inf)", when=lambda cfg: not cfg.trainer.fast_dev_run, resume=True)
    min_epochs: Optional[int] = key(None, within="[0, inf)", example=1, resume=True)
    deterministic: bool = key(False)
    benchmark: Optional[bool] = key(None)
    gradient_clip_val: Optional[float] = key(None, within="[0, inf)", example=1.0)
    gradient_clip_algorithm: Optional[str] = key(None, choices=('norm', 'value'),
                                                 help="norm (Lightning's default) | value")
    accumulate_grad_batches: int = key(1, within="[1, inf)")
    log_every_n_steps: int = key(10, within="[1, inf)", resume=True)
    check_val_every_n_epoch: int = key(1, within="[1, inf)")
    val_check_interval: Optional[float] = key(None, within="(0, inf)", example=0.5)
    limit_train_batches: Optional[float] = key(None, within="[0, inf)")
    limit_val_batches: Optional[float] = key(None, within="[0, inf)")
    limit_test_batches: Optional[float] = key(None, within="[0, inf)")
    fast_dev_run: Any = key(False)
    overfit_batches: float = key(0.0, within="[0, inf)")
    num_sanity_val_steps: Optional[int] = key(None, within="[-1, inf)")
    enable_progress_bar: bool = key(True, resume=True)
    compile: Any = key(False, choices=('false', 'true', 'default', 'reduce-overhead', 'max-autotune'),
                       help='torch.compile the network (fine-tuning; the first steps are slower while it compiles): '
                            "false | true (torch's default mode) | default | reduce-overhead (CUDA graphs: small "
                            'batches on a large GPU) | max-autotune')
    channels_last: bool = key(True,
                              help='NHWC images and conv weights: the fast layout of cuDNN and oneDNN convolutions')
    auto_batch_size: bool = key(False, help="before fit, the largest data.batch_size that fits (Lightning's Tuner)")
    kwargs: Dict[str, Any] = key(factory=dict, help='any other pl.Trainer argument: +trainer.kwargs.X=...')


@dataclass(frozen=True)
class LoggerConfig:
    # Which trackers a run logs to; the logger group's options (logger=mlflow, logger=[csv,mlflow,wandb]) each switch
    # on the flag of their own name, logger=none switches all off. metrics.csv feeds curves.png and sweep summaries.
    csv: bool = key(True, resume=True, help='metrics.csv in the run dir')
    tensorboard: bool = key(False, resume=True, help='tb/ in the run dir (needs the tensorboard package)')
    mlflow: bool = key(False, resume=True, help="an MLflow run (pip install 'transfer-cli[mlflow]')")
    wandb: bool = key(False, resume=True,
                      help='a Weights & Biases run, offline unless WANDB_MODE says otherwise (transfer-cli[wandb])')
    experiment: Optional[str] = key(None, help="the MLflow experiment / W&B project; None: the run's `name`")
    run_name: Optional[str] = key(None, help="None: <name>/<run dir's name>")
    tracking_uri: Optional[str] = key(None,
                                      help='mlflow: where runs are stored; None: $MLFLOW_TRACKING_URI, else '
                                           'sqlite:///<cwd>/outputs/mlflow.db')
    log_model: bool = key(False, resume=True,
                          help='also upload the checkpoint the test scored (else the last one) to mlflow / wandb')
    tags: Dict[str, str] = key(factory=dict, help='extra run tags: +logger.tags.team=vision')
    extra: Dict[str, Any] = key(factory=dict,
                                help='More Lightning loggers, each a _target_ node: '
                                     '+logger.extra.NAME._target_=module.Class (+ its arguments)')


@dataclass(frozen=True)
class CallbacksConfig:
    monitor: str = key("val/acc")
    mode: str = key("max", choices=('max', 'min'))
    save_last: bool = key(True)
    early_stopping_patience: int = key(0, within="[0, inf)", example=5, resume=True, help='0: off')
    rich_progress: bool = key(True, resume=True)
    ema: bool = key(False,
                    help='validate, test and save an exponential moving average of the weights (raw ones kept too)')
    ema_decay: float = key(0.999, within="(0, 1)")
    swa: bool = key(False,
                    help='stochastic weight averaging: validate, test and save the mean of the weights at the end of '
                         'each epoch from callbacks.swa_start on (raw ones kept too); the LR follows the scheduler')
    swa_start: float = key(0.75, within="[0, 1)",
                           help='callbacks.swa: the first averaged epoch, as a fraction of trainer.max_epochs')
    checkpoint_every_n_steps: int = key(0, within="[0, inf)", example=500, resume=True,
                                        help='>0: also refresh last.ckpt every N optimizer steps (long epochs); 0: '
                                             'off')
    test_ckpt: str = key("best", choices=('best', 'last'), resume=True,
                         help='the weights the end-of-run test scores: best (picked on val) | last (final epoch)')
    extra: Dict[str, Any] = key(factory=dict,
                                help='More Lightning callbacks, each a _target_ node: '
                                     '+callbacks.extra.NAME._target_=module.Class (+ its arguments)')


@dataclass(frozen=True)
class EvalConfig:
    tta: str = key("none", choices=('none', 'hflip', 'flips', 'multicrop'),
                   help='test-time augmentation in validation and test: none | hflip | flips | multicrop (logits '
                        'averaged)')
    multicrop_fraction: float = key(0.875, within="(0, 1]",
                                    help='multicrop: side of the four corner crops and the centre crop')


@dataclass(frozen=True)
class TuneConfig:
    # `transfer tune`: an Optuna study of trainings, each sampling `params`; the objective is the run's best
    # callbacks.monitor (maximized for callbacks.mode=max). Set by hparams_search=<name> (configs/hparams_search/).
    n_trials: int = key(20, within="[1, inf)", help='trials of the study in all: running the command again continues it up to this many')
    params: Dict[str, str] = key(factory=dict,
                                 help="config key -> a range in Hydra's sweep grammar: interval(1e-4, 1e-2), tag(log,"
                                      ' interval(...)), integers int(interval(1, 8)), choice(a, b), range(1, 5); a '
                                      'config group too (optimizer: choice(adamw, sgd))')
    sampler: str = key("tpe", choices=('tpe', 'random'), help='seeded by `seed`')
    pruner: str = key("median", choices=('median', 'hyperband', 'none'),
                      help='median | hyperband | none: stop a trial whose monitor lags, judged after each epoch')
    startup_trials: int = key(5, within="[0, inf)", help='trials that run to the end before the pruner judges any')
    warmup_epochs: int = key(1, within="[0, inf)", help='epochs of each trial before it may be pruned')
    study_name: Optional[str] = key(None, help="None: the run's name")
    dir: Optional[str] = key(None,
                             help="the study's folder (trials, optuna.db, summary); None: "
                                  'multirun/<name>/optuna_<study>')
    storage: Optional[str] = key(None, help="an Optuna storage URL, or journal | journal:<file>: Optuna's journal "
                                            "file (<dir>/optuna.journal), for workers on a shared file system; "
                                            "None: sqlite:///<dir>/optuna.db")
    workers: int = key(1, within="[1, inf)", example=2,
                       help='local worker processes on the study (one GPU each where there are GPUs); 1: this process')
    heartbeat_s: int = key(30, within="[1, inf)", help='a running trial records that its worker lives this often')
    grace_s: int = key(120, within="[1, inf)",
                       help='a running trial with no heartbeat for this long is failed and its parameters run again')


@dataclass(frozen=True)
class CalibrationConfig:
    # After training, per checkpoint (best.ckpt, last.ckpt), on the validation split only (none: skipped), stored
    # in the checkpoint and used by `transfer predict` and `transfer eval`; summary.json `calibration`.
    temperature: bool = key(True, resume=True,
                            help='single-label tasks: fit one temperature dividing the logits (val NLL); multilabel: '
                                 'skipped')
    threshold_criterion: str = key("none", choices=('none', 'balanced_accuracy', 'f1', 'recall'), resume=True,
                                   help="Two classes: the decision threshold on the positive class's probability, "
                                        'chosen on val for this criterion: none (argmax) | balanced_accuracy | f1 | '
                                        'recall (the highest threshold whose val recall >= target_recall)')
    target_recall: float = key(0.9, within="(0, 1]", resume=True)
    positive_class: Optional[str] = key(None, resume=True,
                                        help='the class the threshold decides; None: the second class (index 1)')
    bins: int = key(15, within="[1, inf)", resume=True,
                    help='equal-width confidence bins of the ECE and reliability.png')


@dataclass(frozen=True)
class PathsConfig:
    # The run dir: Hydra's run dir when `transfer train` runs; None in a config composed outside a Hydra run.
    output_dir: Optional[str] = key("${hydra:runtime.output_dir}", help="the run dir (set by Hydra)")


@dataclass(frozen=True)
class TrainConfig:
    name: str = key("default", help='the run dir is outputs/<name>/<date>_<time>')
    seed: int = key(42)
    task: str = key("multiclass", choices=('multiclass', 'multilabel'),
                    help='multiclass: one class per image (softmax) | multilabel: a label set (sigmoid)')
    multilabel_threshold: float = key(0.5, within="(0, 1)",
                                      help='multilabel: a label is predicted when its sigmoid >= this (F1, '
                                           'predictions)')
    resume: Optional[str] = key(None, help='a run dir, its .ckpt, or last: continue that run (transfer_cli/resume)')
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
        for name in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            child = node._get_node(name)
            if isinstance(child, (DictConfig, ListConfig)):
                thaw(child)

    node = OmegaConf.structured(schema or TrainConfig)
    thaw(node)
    return node


def _key_reference() -> str:
    from transfer_cli.config.folders import config_groups

    # Hydra fills its help template with string.Template, where "$$" is a literal "$"
    return key_reference(TrainConfig, config_groups()).replace("$", "$$")


def register_configs() -> None:
    """The schema in Hydra's ConfigStore, and the resolvers the YAML files use."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=structured_schema())
    if not OmegaConf.has_resolver("linear_warmup"):
        OmegaConf.register_new_resolver("linear_warmup", linear_warmup)
    if not OmegaConf.has_resolver("transfer_keys"):  # the key reference of `transfer train --help`
        OmegaConf.register_new_resolver("transfer_keys", _key_reference)


__all__ = ["OWN_WARMUP_SCHEDULES", "TrainConfig", "linear_warmup", "register_configs", "structured_schema"]
