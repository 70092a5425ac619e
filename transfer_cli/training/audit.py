"""Pre-flight audit: what trains, at which LR, with which BatchNorm mode, per stage; and a consistency check.

The check guards against the classic silent failures of transfer learning: a parameter that should train but
sits in no optimizer group (it never moves), one that is frozen by the config but still has requires_grad
(it moves when it should not), or one that sits in two groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Set

import torch
from torch import nn

from transfer_cli.atomic import atomic_write_json
from transfer_cli.errors import TransferError
from transfer_cli.models.adapters import is_adapter_param
from transfer_cli.models.stages import BATCH_NORMS

if TYPE_CHECKING:
    from transfer_cli.models.classifier import Classifier

_MAX_LISTED = 8


def _names(params: List[str]) -> str:
    more = f" ... and {len(params) - _MAX_LISTED} more" if len(params) > _MAX_LISTED else ""
    return ", ".join(params[:_MAX_LISTED]) + more


def check_consistency(model: Classifier, optimizer: torch.optim.Optimizer, trainable: Set[str]) -> None:
    """Raise naming the parameters if requires_grad or optimizer membership disagree with `trainable`
    (backbone parameter names that the config says train now; the head always trains)."""
    owner: Dict[int, List[str]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner.setdefault(id(p), []).append(group.get("name", "?"))
    problems = []
    named = [(f"backbone.{n}", n in trainable, p) for n, p in model.backbone.named_parameters()]
    named += [(f"head.{n}", True, p) for n, p in model.head.named_parameters()]
    should_not = [n for n, expected, p in named if p.requires_grad and not expected]
    should = [n for n, expected, p in named if expected and not p.requires_grad]
    orphans = [n for n, _, p in named if p.requires_grad and id(p) not in owner]
    doubled = [n for n, _, p in named if len(owner.get(id(p), [])) > 1]
    if should_not:
        problems.append(f"frozen by the config but requires_grad=True: {_names(should_not)}")
    if should:
        problems.append(f"trainable by the config but requires_grad=False: {_names(should)}")
    if orphans:
        problems.append(f"trainable but in no optimizer group (they would never move): {_names(orphans)}")
    if doubled:
        problems.append(f"in more than one optimizer group: {_names(doubled)}")
    if problems:
        raise TransferError(
            "audit failed: the freeze state and the optimizer disagree; " + "; ".join(problems),
            "something outside the transfer config changed requires_grad or the optimizer; set freezing only "
            "through transfer.* (mode, freeze_stages, freeze, unfreeze) and report this if it persists",
        )


def audit_rows(model: Classifier, optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """One row per stage (and the head): parameter counts, base LRs and weight decay of its groups, BN mode."""
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    named = dict(model.backbone.named_parameters())
    adapters = {id(p) for n, p in named.items() if is_adapter_param(n)}
    modules = dict(model.backbone.named_modules())
    rows = []
    sections = [(s.name, [named[n] for n in s.params], _bn_modes(s.params, modules)) for s in model.stages]
    sections.append(("head", list(model.head.parameters()), []))
    for name, params, bn_modes in sections:
        groups = [group_of[id(p)] for p in params if id(p) in group_of]
        rows.append({
            "stage": name,
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "adapters": sum(p.numel() for p in params if id(p) in adapters),  # of the trainable, transfer=lora's
            "frozen": sum(p.numel() for p in params if not p.requires_grad),
            # The group's base LR (optimizer.lr x its scale): the schedule multiplies every group by one factor,
            # which at fit start is often a warmup's 0.
            "lr": sorted({float(g.get("initial_lr", g["lr"])) for g in groups}),
            "weight_decay": sorted({float(g["weight_decay"]) for g in groups}),
            "groups": sorted({g.get("name", "?") for g in groups}),
            "bn": "/".join(sorted(set(bn_modes))) or "-",
        })
    return rows


def adapted_layers(backbone: nn.Module) -> List[str]:
    """Names of the backbone's layers that carry an adapter, in module order."""
    return list(dict.fromkeys(n.split(".lora_")[0] for n, _ in backbone.named_parameters() if is_adapter_param(n)))


def _bn_modes(params: List[str], modules: Dict[str, nn.Module]) -> List[str]:
    owners = {n.rpartition(".")[0] for n in params}
    return [
        "train" if modules[o].training else "eval"
        for o in owners
        if o in modules and isinstance(modules[o], BATCH_NORMS)
    ]


def print_audit(rows: List[Dict[str, Any]], epoch: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"transfer audit (epoch {epoch})", title_justify="left")
    adapted = any(r.get("adapters") for r in rows)  # the column only where adapters exist (transfer=lora)
    counts = ("trainable", "of which adapters", "frozen") if adapted else ("trainable", "frozen")
    for column in ("stage", *counts, "base lr", "weight decay", "BN"):
        table.add_column(column, justify="right" if column in counts else "left")
    for r in rows:
        numbers = [f"{r['trainable']:,}", *([f"{r['adapters']:,}"] if adapted else []), f"{r['frozen']:,}"]
        table.add_row(r["stage"], *numbers, ", ".join(f"{v:.3g}" for v in r["lr"]) or "-",
                      ", ".join(f"{v:.3g}" for v in r["weight_decay"]) or "-", r["bn"])
    Console().print(table)


def write_audit(path: Path, entry: Dict[str, Any]) -> None:
    """Append this check (fit start, or an unfreeze milestone) to audit.json."""
    history = []
    if path.is_file():
        try:
            history = json.loads(path.read_text())["checks"]
        except (ValueError, KeyError, TypeError):
            history = []
    history.append(entry)
    atomic_write_json(path, {"checks": history})
