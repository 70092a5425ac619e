"""A backbone's stages (stem, stage1 .. stageK) from timm's own parameter grouping.

Freezing, gradual unfreezing, layer-wise LR decay and the audit all speak in these stages, so one config works
for ResNets (stem, layer1-4), EfficientNets (stem, blocks.0-6), ConvNeXts (stem, stages.0-3) and ViTs (patch
embedding, blocks.0-11) alike. The backbone's final layers (EfficientNet's conv_head/bn2, a ViT's norm,
ConvNeXt's head.norm) join the last stage, as in timm's own grouping, because they sit right below the head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from torch import nn

from transfer_cli.errors import TransferError

STEM = "stem"
# Every BatchNorm that keeps running statistics (timm's BatchNormAct2d subclasses BatchNorm2d).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class Stage:
    name: str  # "stem", "stage3"; "m1.stage3" for the second backbone of a feature combination
    index: int  # 0 for the stem, k for stage k
    depth: int  # distance from the head: the last stage is 1, the stem K + 1 (layer-wise LR decay's exponent)
    params: List[str] = field(default_factory=list)  # parameter names, relative to the backbone


def _body_patterns(blocks) -> Tuple[List[re.Pattern], List[re.Pattern]]:
    """timm's `blocks` matcher as (per-stage patterns, patterns of the final layers that carry a fixed ordinal)."""
    entries = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
    body = [re.compile(p) for p, suffix in entries if suffix is None]
    final = [re.compile(p) for p, suffix in entries if suffix is not None]
    return body, final


def timm_stages(model: nn.Module, prefix: str = "") -> List[Stage]:
    """Stages of one timm model; `prefix` is prepended to the stage names (and is not part of param names)."""
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        matcher = None
    names = [n for n, _ in model.named_parameters()]
    if not isinstance(matcher, dict) or "stem" not in matcher or "blocks" not in matcher:
        # No grouping known to timm for this model: one stage, so freeze/unfreeze work all-or-nothing.
        return [Stage(f"{prefix}stage1", 1, 1, names)]
    stem = re.compile(matcher["stem"])
    body, _ = _body_patterns(matcher["blocks"])
    keyed: Dict[str, Tuple[int, ...]] = {}
    stem_params, rest = [], []
    for name in names:
        if stem.match(name):
            stem_params.append(name)
            continue
        for pattern in body:
            m = pattern.match(name)
            if m:
                keyed[name] = tuple(int(g) for g in m.groups() if g is not None)
                break
        else:
            rest.append(name)  # final norm / conv_head / anything unmatched: belongs with the last stage
    order = sorted(set(keyed.values()))
    count = max(1, len(order))
    stages = [Stage(f"{prefix}{STEM}", 0, count + 1, stem_params)]
    stages += [Stage(f"{prefix}stage{i + 1}", i + 1, count - i) for i in range(count)]
    position = {key: i + 1 for i, key in enumerate(order)}
    for name, key in keyed.items():
        stages[position[key]].params.append(name)
    stages[-1].params.extend(rest)
    return stages


def backbone_stages(backbone: nn.Module) -> List[Stage]:
    """Stages of a backbone: a timm model, or one of our wrappers that says how to reach its timm models."""
    if hasattr(backbone, "transfer_stages"):  # not `stages`: ConvNeXt has a module of that name
        return backbone.transfer_stages()
    return timm_stages(backbone)


def resolve_stage_refs(refs, stages: List[Stage], what: str) -> List[str]:
    """Stage names from what a user wrote: "stem", "stage3", relative "stage-1" (the last stage), or "all".

    With several backbones (feature combination) an unprefixed name means that stage of every backbone.
    """
    refs = [refs] if isinstance(refs, (str, int)) else list(refs)
    names = [s.name for s in stages]
    out: List[str] = []
    for ref in refs:
        ref = str(ref)
        if ref == "all":
            out += names
            continue
        if ref == "head":
            continue  # the head always trains
        matched = [s.name for s in stages if _ref_matches(ref, s, stages)]
        if not matched:
            import difflib

            close = difflib.get_close_matches(ref, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TransferError(
                f"{what}: no stage '{ref}' in this backbone (stages: {', '.join(names)}){hint}",
                "use stage names from the audit table (stem, stage1 ... stageK), stage-1 for the last, or all",
            )
        out += matched
    return list(dict.fromkeys(out))


def _ref_matches(ref: str, stage: Stage, stages: List[Stage]) -> bool:
    member, _, local = stage.name.rpartition(".")
    if ref == stage.name or (member and ref == local):
        return True
    m = re.fullmatch(r"stage-(\d+)", ref.split(".")[-1])
    if m is None:
        return False
    ref_member = ref.rpartition(".")[0]
    if ref_member and ref_member != member:
        return False
    last = max(s.index for s in stages if s.name.rpartition(".")[0] == member)
    return stage.index == last + 1 - int(m.group(1))
