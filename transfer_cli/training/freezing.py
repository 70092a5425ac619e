"""Which parameters train, as a pure function of (epoch, transfer config, the backbone's stages), and applying it.

Every mode is one rule over stages (see models/stages.py):
  feature_extract   only the head
  fine_tune         everything
  partial           everything but the stem and the first `freeze_stages` stages
  gradual_unfreeze  the head, plus the stages named by every milestone reached so far (`transfer.unfreeze`)
  lora              the adapters peft added to the backbone (models/adapters.py), never its own weights
`transfer.freeze_stages` and the `transfer.freeze` regexes also hold in fine_tune and gradual_unfreeze, as a
floor that no milestone thaws. Nothing is carried over from the previous epoch: the state is re-derived and
re-applied at fit start and at every epoch start, so a run resumed past a milestone lands in the same state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Set

from torch import nn

from transfer_cli.config.modes import transfer_mode
from transfer_cli.errors import TransferError
from transfer_cli.models.adapters import is_adapter_param
from transfer_cli.models.stages import BATCH_NORMS, Stage, resolve_stage_refs

if TYPE_CHECKING:
    from transfer_cli.models.classifier import Classifier

FOREVER = 10**9  # an epoch after every milestone: the set of parameters that ever train


@dataclass(frozen=True)
class Milestone:
    epoch: int
    stages: tuple  # stage names thawed at this epoch
    lr_scale: float  # LR multiplier of those stages (ULMFiT-style smaller steps for earlier layers)


def milestones(transfer_cfg: Any, stages: List[Stage]) -> List[Milestone]:
    """`transfer.unfreeze` as sorted milestones. A value is stage refs (`stage4`, `[stage4, stage3]`, `all`,
    `head`, `stage-1` for the last) or `{stages: ..., lr_scale: 0.5}`."""
    if transfer_cfg.mode != "gradual_unfreeze":
        return []
    spec = transfer_cfg.unfreeze or {}
    if not spec:
        spec = _every_n_epochs(int(transfer_cfg.unfreeze_every), stages)
    if not hasattr(spec, "items"):
        raise TransferError(f"transfer.unfreeze must map epochs to stages, got {spec!r}",
                            "transfer.unfreeze='{0: head, 2: [stage-1], 4: all}'")
    out = []
    for epoch, value in spec.items():
        try:
            epoch = int(epoch)
        except (TypeError, ValueError):
            raise TransferError(f"transfer.unfreeze: milestone key '{epoch}' is not an epoch number",
                                "transfer.unfreeze='{0: head, 2: [stage-1], 4: all}'")
        scale = 1.0
        if hasattr(value, "keys"):
            unknown = set(value.keys()) - {"stages", "lr_scale"}
            if unknown:
                raise TransferError(f"transfer.unfreeze.{epoch}: unknown keys {sorted(unknown)}",
                                    f"transfer.unfreeze.{epoch}={{stages: [stage-1], lr_scale: 0.5}}")
            scale = float(value.get("lr_scale", 1.0))
            value = value.get("stages", [])
        names = resolve_stage_refs(value, stages, f"transfer.unfreeze.{epoch}")
        out.append(Milestone(epoch, tuple(names), scale))
    return sorted(out, key=lambda m: m.epoch)


def _every_n_epochs(every: int, stages: List[Stage]) -> Dict[int, Any]:
    """The default schedule: the head alone first, then one more stage from the top every `every` epochs."""
    if every <= 0:
        raise TransferError("transfer=gradual_unfreeze needs transfer.unfreeze milestones or unfreeze_every > 0",
                            "transfer.unfreeze_every=1, or transfer.unfreeze='{0: head, 2: [stage-1], 4: all}'")
    depth = max(s.index for s in stages) + 1  # stem + stages of the deepest backbone
    return {0: "head", **{every * k: [f"stage-{k}"] for k in range(1, depth + 1)}}


def permanently_frozen(transfer_cfg: Any, stages: List[Stage]) -> Set[str]:
    """Parameter names no epoch may train: the stem + first `freeze_stages` stages, and `freeze` regex matches."""
    mode = transfer_mode(transfer_cfg.mode)
    if mode.frozen_backbone:
        return {p for s in stages for p in s.params}
    if mode.adapters:  # the original weights; `freeze` regexes may also hold some adapters back
        frozen = {p for s in stages for p in s.params if not is_adapter_param(p)}
        return frozen | _regex_frozen(transfer_cfg, stages)
    n = int(transfer_cfg.freeze_stages or 0)
    if transfer_cfg.mode == "partial" and n <= 0 and not transfer_cfg.freeze:
        raise TransferError("transfer=partial needs something to freeze",
                            "transfer.freeze_stages=2 (stem + first 2 stages) or transfer.freeze=['<regex>']")
    frozen = {p for s in stages if n > 0 and s.index <= n for p in s.params}
    return frozen | _regex_frozen(transfer_cfg, stages)


def _regex_frozen(transfer_cfg: Any, stages: List[Stage]) -> Set[str]:
    frozen: Set[str] = set()
    every = [p for s in stages for p in s.params]
    for pattern in [re.compile(p) for p in (transfer_cfg.freeze or [])]:
        hits = [p for p in every if pattern.search(p)]
        if not hits:
            raise TransferError(f"transfer.freeze: '{pattern.pattern}' matches no backbone parameter",
                                f"check the names in audit.json, e.g. {every[0] if every else '-'}")
        frozen.update(hits)
    return frozen


def _nothing(transfer_cfg: Any, stages: List[Stage], epoch: int) -> Set[str]:
    return set()


def _every_stage(transfer_cfg: Any, stages: List[Stage], epoch: int) -> Set[str]:
    return {s.name for s in stages}  # less permanently_frozen: partial's frozen stages, any mode's freeze regexes


def _milestones_reached(transfer_cfg: Any, stages: List[Stage], epoch: int) -> Set[str]:
    return {n for m in milestones(transfer_cfg, stages) if m.epoch <= epoch for n in m.stages}


# transfer=<mode> (config/modes.py MODES): the stages (by name) thawed in an epoch, before the permanent freezes
# are taken out
RULES: Dict[str, Callable[[Any, List[Stage], int], Set[str]]] = {
    "feature_extract": _nothing,
    "fine_tune": _every_stage,
    "partial": _every_stage,
    "gradual_unfreeze": _milestones_reached,
    "lora": _every_stage,  # less permanently_frozen: every original weight
}


def trainable_params(transfer_cfg: Any, stages: List[Stage], epoch: int) -> Set[str]:
    """Names of the backbone parameters that train in `epoch` (the head always trains)."""
    thawed = RULES[transfer_cfg.mode](transfer_cfg, stages, epoch)
    candidates = {p for s in stages if s.name in thawed for p in s.params}
    return candidates - permanently_frozen(transfer_cfg, stages)


def stage_lr_scales(transfer_cfg: Any, stages: List[Stage]) -> Dict[str, float]:
    """Each stage's LR multiplier: backbone_lr_scale x layer_decay ** depth x its milestone's lr_scale."""
    decay = transfer_cfg.layer_decay
    scales = {}
    for s in stages:
        scale = float(transfer_cfg.backbone_lr_scale)
        if decay is not None:
            scale *= float(decay) ** s.depth
        scales[s.name] = scale
    for m in milestones(transfer_cfg, stages):
        for name in m.stages:
            scales[name] *= m.lr_scale
    return scales


class FreezePlan:
    """A run's transfer mode over its backbone's stages: what trains in each epoch, and at which LR scale.

    Everything here is a function of (epoch, transfer config, stages); `apply` sets it on the network.
    """

    def __init__(self, transfer_cfg: Any, stages: List[Stage]):
        self.transfer = transfer_cfg
        self.stages = stages
        permanently_frozen(transfer_cfg, stages)  # a freeze regex matching nothing fails now, not at fit start
        milestones(transfer_cfg, stages)  # likewise a malformed transfer.unfreeze

    def trainable(self, epoch: int) -> Set[str]:
        return trainable_params(self.transfer, self.stages, epoch)

    def ever_trainable(self) -> Set[str]:
        """Every parameter that trains in some epoch: the optimizer's groups hold these from the start."""
        return self.trainable(FOREVER)

    def lr_scales(self) -> Dict[str, float]:
        return stage_lr_scales(self.transfer, self.stages)

    def apply(self, model: Classifier, epoch: int) -> Set[str]:
        return apply_freeze(model, self.transfer, epoch)


def apply_freeze(model: Classifier, transfer_cfg: Any, epoch: int) -> Set[str]:
    """Set requires_grad and BatchNorm modes on `model` (a Classifier) for `epoch`; returns the trainable names."""
    trainable = trainable_params(transfer_cfg, model.stages, epoch)
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(name in trainable)
    for param in model.head.parameters():
        param.requires_grad_(True)
    model.frozen_backbone = not trainable
    model.eval_modules = NORM_MODES[transfer_cfg.bn](model.backbone)
    model.train(model.training)  # re-applies eval mode to whatever just became frozen
    return trainable


def frozen_norms(backbone: nn.Module) -> List[nn.Module]:
    """What must stay in eval mode under bn=frozen: the whole backbone when nothing in it trains (dropout off
    too, so features are deterministic and cacheable), else each BatchNorm whose own parameters are frozen."""
    if not any(p.requires_grad for p in backbone.parameters()):
        return [backbone]
    return [
        module for module in backbone.modules()
        if isinstance(module, BATCH_NORMS)
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def every_norm(backbone: nn.Module) -> List[nn.Module]:
    """What stays in eval mode under bn=eval: every BatchNorm, trained or not, so each normalizes with the
    pretrained running statistics and a probe fitted on eval-mode features fits the network that fine-tunes."""
    if not any(p.requires_grad for p in backbone.parameters()):
        return [backbone]
    return [module for module in backbone.modules() if isinstance(module, BATCH_NORMS)]


# transfer.bn=<name>: the backbone modules held in eval mode whatever mode Lightning sets
NORM_MODES: Dict[str, Callable[[nn.Module], List[nn.Module]]] = {
    "frozen": frozen_norms,
    "eval": every_norm,
    "train": lambda backbone: [],
}
