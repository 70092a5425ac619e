"""Calibration at the end of a run: each saved checkpoint's validation logits, its temperature (and binary
decision threshold) fitted on them, and the result written into that checkpoint's `transfer` block.

The calibration belongs to a set of weights, so it lives in the checkpoint that holds them (plain data, loadable
with weights_only=True): best.ckpt and last.ckpt each get their own, and `transfer predict` / `transfer eval`
read it from whichever checkpoint they load. A resumed run that trains on writes checkpoints without it (the
module's block), and calibrates again at its end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError

log = logging.getLogger("transfer_cli")
BLOCK_KEY = "calibration"  # inside the checkpoint's `transfer` block


def positive_index(cfg: TrainConfig, class_names: Sequence[str]) -> int:
    """The class calibration.threshold_criterion decides; checked before training, with the class names known."""
    c = cfg.calibration
    if c.threshold_criterion != "none" and (cfg.task != "multiclass" or len(class_names) != 2):
        raise TransferError(f"calibration.threshold_criterion={c.threshold_criterion} chooses the decision threshold "
                            f"of a two-class task, but the data has {len(class_names)} classes",
                            "calibration.threshold_criterion=none (the most probable class wins)")
    if c.positive_class is None:
        return 1
    if c.positive_class not in class_names:
        raise TransferError(f"calibration.positive_class={c.positive_class} is not a class of the data",
                            f"one of: {', '.join(class_names)}")
    return list(class_names).index(c.positive_class)


def skip_reason(cfg: TrainConfig, has_val: bool) -> Optional[str]:
    c = cfg.calibration
    if not c.temperature and c.threshold_criterion == "none":
        return "calibration.temperature=false and calibration.threshold_criterion=none"
    if cfg.task == "multilabel":
        return "task=multilabel: no temperature per label is fitted; probabilities are the sigmoids as trained"
    if not has_val:
        return ("no validation split (data.val_fraction=0): nothing held out to fit on, and the training images "
                "would make the network look surer than it is")
    return None


def _val_logits(run: Any, device: Any) -> tuple[Any, Any]:
    """The validation split's logits as validation computed them (features or images, eval.tta), through the
    one inference loop."""
    from transfer_cli.inference import autocast_for, infer

    module = run.module
    prepare = None if run.feature_cache else (lambda batch: run.images.strip_bad(batch, device))
    return infer(module.eval_logits, run.datamodule.val_dataloader(), device=device,
                 autocast=autocast_for(device, run.cfg.trainer.precision), channels_last=module.channels_last,
                 prepare=prepare)


def _load_weights(model: Any, state_dict: dict) -> None:
    from transfer_cli.commands.restore import MODEL_PREFIX

    model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)})


def calibrate_checkpoints(run: Any, checkpoints: Sequence[Optional[str | Path]]) -> dict:
    """Fit and store the calibration of each checkpoint (best first); returns summary.json's `calibration`:
    the first checkpoint's block (the one `transfer predict ckpt=<run dir>` loads), naming it, with the
    others' temperature and threshold."""
    from transfer_cli.atomic import atomic_torch_save
    from transfer_cli.resume.checkpoints import CHECKPOINT_KEY, forget_checkpoint, read_checkpoint
    from transfer_cli.training.calibration import fit_calibration

    cfg, c = run.cfg, run.cfg.calibration
    paths = list(dict.fromkeys(Path(p).resolve() for p in checkpoints if p and Path(p).is_file()))
    reason = skip_reason(cfg, bool(run.splits.val)) or (None if paths else "the run saved no checkpoint")
    if reason is not None:
        log.info("calibration skipped: %s", reason)
        return {"skipped": reason}
    if not run.trainer.is_global_zero:  # rank zero rewrites the files; the others have nothing to report
        return {}
    names = list(run.splits.class_names)
    criterion, positive = c.threshold_criterion, positive_index(cfg, names)
    if criterion != "none" and len({t for _, t in run.splits.val}) < 2:
        log.warning("calibration.threshold_criterion=%s skipped: the validation split holds one class only", criterion)
        criterion = "none"
    module, device = run.module, run.trainer.strategy.root_device
    was_on = next(module.model.parameters()).device
    module.model.to(device).eval()
    blocks: dict[str, dict] = {}
    try:
        for path in paths:
            ckpt = read_checkpoint(path)  # shared with the command's other readers: copied, never changed
            _load_weights(module.model, ckpt["state_dict"])
            logits, targets = _val_logits(run, device)
            block = fit_calibration(logits, targets, names, temperature=c.temperature, criterion=criterion,
                                    target_recall=c.target_recall, positive_index=positive, bins=c.bins)
            atomic_torch_save({**ckpt, CHECKPOINT_KEY: {**ckpt[CHECKPOINT_KEY], BLOCK_KEY: block}}, path)
            blocks[path.name] = block
            log.info("calibration of %s on %d val images: temperature %.4f, ECE %.4f -> %.4f, NLL %.4f -> %.4f%s",
                     path.name, block["images"], block["temperature"], block["ece_val_before"],
                     block["ece_val_after"], block["nll_val_before"], block["nll_val_after"],
                     "" if block["threshold"] is None else f"; {block['positive_class']} when p >= "
                     f"{block['threshold']:.4f} ({criterion}"
                     + (f" >= {c.target_recall:g})" if criterion == "recall" else ")"))
    finally:
        forget_checkpoint()
        module.model.to(was_on)
    first = paths[0].name
    summary = {"checkpoint": first, **blocks[first]}
    others = {name: {k: b[k] for k in ("temperature", "threshold")} for name, b in blocks.items() if name != first}
    if others:
        summary["other_checkpoints"] = others
    return summary


__all__ = ["calibrate_checkpoints", "positive_index", "skip_reason", "BLOCK_KEY"]
