"""`transfer soup ckpt=[runA,runB,...] [method=uniform|greedy] [output=DIR]`: one checkpoint, the mean of the weights
of runs with one architecture and one start (models/soup.py).

Refused unless the members agree on the classes, the task, the preprocessing, the network (model.* but the head's
dropout) and its initial weights (the same pretrained source, or for a random init the same seed), and their
state dicts match name for name and shape for shape. Scores come from the validation split only, which every
member must share (k-fold runs, whose val folds differ, can make a uniform soup but not a greedy one): the members'
own callbacks.monitor (val/acc by default; val/loss is the cross-entropy without label smoothing). BatchNorm
running statistics are averaged like the weights, not recomputed on training images.

The result is `<output>/checkpoints/best.ckpt`, a checkpoint like a run's (the best member's config and `transfer`
block, the averaged weights, a temperature and threshold fitted again on val for the soup's own weights), which
eval, predict, export and model.weights= take, plus `<output>/soup.json`; it holds no optimizer state, so it is not
resumed (resume/plan.py says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from transfer_cli.config.args import CHECKPOINTS, Option, parse_command_args
from transfer_cli.errors import TransferError
from transfer_cli.resume.plan import SOUP_KEY

if TYPE_CHECKING:  # the name only: restore.py brings OmegaConf and the model code, loaded when a command runs
    from transfer_cli.commands.restore import Restored

log = logging.getLogger("transfer_cli")

METHODS = ("uniform", "greedy")
SOUP_FILE = "soup.json"
BATCHNORM = "running statistics averaged with the weights, not recomputed"
OPTIONS = {
    "ckpt": Option(CHECKPOINTS, required=True, help="[a,b,...] or a folder with ensemble.json: runs of one start",
                   example="[outputs/<name>/<run a>,outputs/<name>/<run b>]"),
    "method": Option(str, "uniform", help="uniform (every member) or greedy (added while val does not drop)",
                     choices=METHODS),
    "output": Option(str, None, help="the soup's folder (default: a new outputs/soup/<date>_<time>)", example="soup"),
}
# How the val images are read and where it runs; not which images (the members' own val split).
OVERRIDES = ("data.eval_batch_size", "data.num_workers", "trainer.accelerator", "trainer.precision",
             "trainer.channels_last")
_KEPT = ("state_dict", "transfer", "epoch", "global_step", "pytorch-lightning_version")
# model.* keys that do not change the weights' meaning
_FREE_MODEL_KEYS = ("head_dropout",)


@dataclass
class _Member:
    ref: Path
    path: Path
    ckpt: dict

    @property
    def meta(self) -> dict:
        return self.ckpt["transfer"]

    @property
    def config(self) -> dict:
        return self.meta["config"]


def _read(refs: Sequence[Path]) -> list[_Member]:
    from transfer_cli.resume.checkpoints import checkpoint_meta, forget_checkpoint, read_checkpoint, resolve_checkpoint
    from transfer_cli.training.finite import check_weights

    out = []
    for ref in refs:
        path = resolve_checkpoint(ref)
        ckpt = read_checkpoint(path)
        checkpoint_meta(ckpt, path)
        if "state_dict" not in ckpt:
            raise TransferError(f"{path} holds no state_dict", "pass checkpoints written by `transfer train`")
        check_weights(ckpt["state_dict"], str(path))
        # the weights and our block only: optimizer states and loop counters are not souped
        out.append(_Member(ref, path, {k: ckpt[k] for k in _KEPT if k in ckpt}))
    forget_checkpoint()
    return out


def _start(config: dict) -> dict:
    """What decides a run's initial weights: the network, its pretrained source, and for a random init the seed."""
    model = {k: v for k, v in config["model"].items() if k not in _FREE_MODEL_KEYS}
    random_init = not model.get("pretrained") and not model.get("weights")
    return {"model": model, **({"seed": config.get("seed")} if random_init else {})}


def check_soupable(members: Sequence[_Member]) -> None:
    """Refuse members a mean of weights does not fit: other classes, task, preprocessing, network or start."""
    from transfer_cli.models.soup import mismatch

    from transfer_cli.config.modes import MODES

    for m in members:
        mode = MODES.get(str((m.config.get("transfer") or {}).get("mode")))
        if mode is not None and mode.adapters:
            # The mean of separately averaged factors B and A is not the mean of the updates B A.
            raise TransferError(f"{m.ref} trained adapters (transfer={mode.name}): a soup averages whole weights",
                                "average their predictions instead: transfer eval ckpt=[...] (an ensemble)")
    first = members[0]
    fix = ("average runs fine-tuned from one start (the same model.* and weights, for a random init the same seed) "
           "on the same classes; to combine other runs, average their predictions instead: transfer eval "
           "ckpt=[...] (an ensemble)")
    for m in members[1:]:
        for what, a, b in (("classes", first.meta["class_names"], m.meta["class_names"]),
                           ("task", first.meta.get("task"), m.meta.get("task")),
                           ("preprocessing", first.meta["data_config"], m.meta["data_config"]),
                           ("start (network and initial weights)", _start(first.config), _start(m.config))):
            if a != b:
                raise TransferError(f"{first.ref} and {m.ref} differ in their {what}: {_diff(a, b)}", fix)
        why = mismatch(first.ckpt["state_dict"], m.ckpt["state_dict"])
        if why:
            raise TransferError(f"the weights of {m.ref} do not match {first.ref}'s: {why}", fix)


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return "; ".join(f"{k}: {_diff(a.get(k), b.get(k))}" for k in keys[:3])
    return f"{a} vs {b}"


def _scorer(cfg: Any, task: str, n: int) -> tuple[str, bool, Callable[[Any, Any], float]]:
    """(the metric's name, whether higher is better, metric(logits, targets)): the runs' own callbacks.monitor where
    it is a val metric computable from the logits, else val/acc."""
    import torch.nn.functional as F

    from transfer_cli.training.metrics import stage_metrics

    monitor, mode = str(cfg.callbacks.monitor), str(cfg.callbacks.mode)
    if monitor == "val/loss":
        def loss(logits: Any, targets: Any) -> float:
            if task == "multilabel":
                return float(F.binary_cross_entropy_with_logits(logits.double(), targets.double()))
            return float(F.cross_entropy(logits.double(), targets.long()))
        return "val/loss", False, loss
    names = set(stage_metrics(task, n, "val", cfg.multilabel_threshold).keys())
    if monitor not in names:
        log.info("soup: callbacks.monitor=%s is no val metric of the logits; scoring val/acc", monitor)
        monitor, mode = "val/acc", "max"

    def metric(logits: Any, targets: Any) -> float:
        return float(stage_metrics(task, n, "val", cfg.multilabel_threshold)(logits, targets)[monitor])
    return monitor, mode == "max", metric


def _val_data(members: Sequence[_Member], restored: Restored, overrides: Sequence[str]) -> Any:
    """The val images all members share, read as the first does; None when they hold different val splits (or
    none)."""
    from omegaconf import OmegaConf

    from transfer_cli.assembly.data import discover, image_data
    from transfer_cli.commands.evaluate import _remap
    from transfer_cli.commands.restore import apply_overrides
    from transfer_cli.config.resolve import resolve_run
    from transfer_cli.inference import pick_device

    names, task = restored.class_names, restored.task
    splits = _remap(discover(restored.cfg.data, task), names)
    for m in members[1:]:
        cfg = resolve_run(apply_overrides(OmegaConf.create(m.config), overrides))
        if _remap(discover(cfg.data, task), names).val != splits.val:
            return None
    if not splits.val:
        return None
    cfg = restored.cfg
    return image_data(cfg, splits, restored.data_config, device=pick_device(cfg.trainer.accelerator))


def soup(ckpt: Any, method: str = "uniform", output: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Average the members' weights (uniformly, or greedily on val); returns soup.json's record."""
    from transfer_cli.commands.members import members_of
    from transfer_cli.outputs import command_dir

    if method not in METHODS:
        raise TransferError(f"method={method} is not one of {', '.join(METHODS)}", "method=uniform")
    spec = members_of(ckpt)
    if spec is None:
        raise TransferError("a soup averages two or more checkpoints", "ckpt=[<run a>,<run b>,...]")
    if not spec.uniform:
        raise TransferError(f"{spec.source} weighs its members; a soup averages its ingredients uniformly",
                            'drop "weights" from ensemble.json, or pass the members as ckpt=[...]')
    ours = output is not None and (Path(output).expanduser() / SOUP_FILE).is_file()  # an earlier soup: replaced
    out_dir = Path(output).expanduser().resolve() if ours else command_dir(output, "soup")
    members = _read(spec.refs)
    if out_dir in {m.path.parent.parent for m in members} or out_dir in {m.path.parent for m in members}:
        raise TransferError(f"output={output} holds one of the soup's members", "output=<a folder of its own>")
    check_soupable(members)
    return _cook(members, spec, method, out_dir, overrides)


def _cook(members: list[_Member], spec: Any, method: str, out_dir: Path, overrides: Sequence[str]) -> dict:
    from transfer_cli.assembly.calibration import BLOCK_KEY, positive_index, skip_reason
    from transfer_cli.atomic import atomic_torch_save, atomic_write_json
    from transfer_cli.commands.evaluate import collect_logits
    from transfer_cli.commands.restore import MODEL_PREFIX, restore
    from transfer_cli.models.soup import average_state_dicts, greedy_soup
    from transfer_cli.resume.checkpoints import CHECKPOINT_KEY
    from transfer_cli.run_files import RunLayout
    from transfer_cli.training.calibration import fit_calibration

    restored = restore(members[0].path, overrides)  # one network, whose weights each candidate replaces
    cfg, names = restored.cfg, restored.class_names
    images = _val_data(members, restored, overrides)
    state_dicts = [m.ckpt["state_dict"] for m in members]

    def val_logits(state_dict: Any) -> tuple[Any, Any]:
        restored.model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in state_dict.items()
                                        if k.startswith(MODEL_PREFIX)})
        return collect_logits(restored, images, "val")

    metric_name, higher, metric = _scorer(cfg, restored.task, len(names))
    record: dict[str, Any] = {"method": method, "source": spec.source, "metric": metric_name, "batchnorm": BATCHNORM,
                              "members": [str(m.path) for m in members]}
    if images is None:
        if method == "greedy":
            raise TransferError("a greedy soup is chosen on a val split that every member holds, and these members' "
                                "val splits differ (or they have none)", "method=uniform")
        record["val"] = "skipped: the members hold different val splits (or none)"
        state = average_state_dicts(state_dicts)
        chosen = list(range(len(members)))
        block = None
    else:
        if method == "greedy":
            result = greedy_soup(state_dicts, lambda sd: metric(*val_logits(sd)), higher)
            state, chosen, member_scores = result.state_dict, result.chosen, result.member_scores
            record["greedy_steps"] = [{**s, "member": str(members[s["member"]].path)} for s in result.steps]
        else:
            member_scores = [metric(*val_logits(sd)) for sd in state_dicts]
            state, chosen = average_state_dicts(state_dicts), list(range(len(members)))
        logits, targets = val_logits(state)
        record["member_val"] = {str(m.path): s for m, s in zip(members, member_scores)}
        record["val"] = {metric_name: metric(logits, targets), "images": int(len(targets))}
        reason = skip_reason(cfg, True)
        c = cfg.calibration
        block = None if reason else fit_calibration(
            logits, targets, names, temperature=c.temperature, criterion=c.threshold_criterion,
            target_recall=c.target_recall, positive_index=positive_index(cfg, names), bins=c.bins)
    record["chosen"] = [str(members[i].path) for i in chosen]
    base = members[chosen[0]].ckpt  # the best member (greedy) or the first: its config and block
    meta = {k: v for k, v in base[CHECKPOINT_KEY].items() if k != BLOCK_KEY}
    if block is not None:
        meta[BLOCK_KEY] = block
    meta[SOUP_KEY] = {k: record[k] for k in ("method", "chosen", "metric", "batchnorm")}
    checkpoint = {"state_dict": state, CHECKPOINT_KEY: meta, "epoch": base.get("epoch", 0),
                  "global_step": base.get("global_step", 0),
                  "pytorch-lightning_version": base.get("pytorch-lightning_version")}
    path = atomic_torch_save(checkpoint, RunLayout(out_dir).best)
    record["checkpoint"] = str(path)
    if block is not None:
        record["calibration"] = {k: block[k] for k in ("temperature", "threshold", "ece_val_before", "ece_val_after")}
    atomic_write_json(out_dir / SOUP_FILE, record)
    return record


def soup_command(args: list[str]) -> None:
    options, overrides = parse_command_args("soup", args, OPTIONS, OVERRIDES)
    record = soup(options["ckpt"], options["method"], options["output"], overrides)
    for path in record["members"]:
        score = record.get("member_val", {}).get(path)
        print(f"  {'*' if path in record['chosen'] else ' '} {path}"
              + (f"  {record['metric']} {score:.4f}" if score is not None else ""))
    val = record["val"]
    print(f"{record['method']} soup of {len(record['chosen'])} of {len(record['members'])} (* chosen)"
          + (f": {record['metric']} {val[record['metric']]:.4f} on {val['images']} val images"
             if isinstance(val, dict) else f"; val {val}"))
    run_dir = Path(record["checkpoint"]).parent.parent
    print(f"wrote {record['checkpoint']}; use it as ckpt={run_dir} (eval, predict, export) or model.weights=")


__all__ = ["soup", "soup_command", "check_soupable", "OPTIONS", "OVERRIDES", "METHODS", "SOUP_FILE", "SOUP_KEY"]
