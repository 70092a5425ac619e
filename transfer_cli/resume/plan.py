"""`transfer train resume=<run dir | .ckpt | last> [safe overrides]`: which checkpoint, which config, which run dir.

A resumed run is the same run, continued: its composed config comes back from the checkpoint (not from today's
configs/ folder), it writes into the same run dir, and only keys that cannot change what the run computes may be
overridden (SAFE_ON_RESUME); the run's length is one of them, so `trainer.max_epochs=N` extends it. Anything
else is a different experiment: a new run initialized from the checkpoint (`model.weights=<ckpt>`).
"""

from __future__ import annotations

import logging
import shlex
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from transfer_cli.config.keys import declared
from transfer_cli.config.overrides import later_wins, names, override_key, parse, take
from transfer_cli.config.schema import TrainConfig
from transfer_cli.errors import TransferError
from transfer_cli.resume.checkpoints import (
    CHECKPOINT_KEY, checkpoint_config, checkpoints_in, is_whole, read_checkpoint, resolve_checkpoint, run_dir_of,
)

log = logging.getLogger("transfer_cli")

RESUME_KEY = "resume"
# Keys a resumed run may change: the run's length, logging and progress display, how data is loaded (not what),
# how often it checkpoints, and the calibration fitted after training. Each is declared on its schema field
# (`key(resume=True)`, config/schema.py); a key listed here also allows every key below it.
SAFE_ON_RESUME = tuple(dotted for dotted, _, spec in declared(TrainConfig) if spec.resume)
# Only with resume=last: they pick the experiment whose newest run continues, and must match that run.
SELECTORS = ("experiment", "name")
SOUP_KEY = "soup"  # in the `transfer` block of a `transfer soup` checkpoint (commands/soup.py)


@dataclass
class ResumePlan:
    run_dir: Path
    checkpoint: Path
    config: Any  # DictConfig: the checkpoint's config with the accepted overrides applied
    overrides: list[str] = field(default_factory=list)  # the accepted key=value overrides
    hydra_overrides: list[str] = field(default_factory=list)  # hydra.* overrides, passed on to Hydra


def resume_command(run_dir: str | Path) -> str:
    return f"transfer train resume={shlex.quote(str(run_dir))}"


def is_resume(overrides: list[str]) -> bool:
    return names(overrides, RESUME_KEY)


def _parse(overrides: list[str]) -> list[Any]:
    return parse(overrides, fix="write them as key=value, e.g. trainer.max_epochs=20")


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_ON_RESUME)


def original_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was started with (Hydra's .hydra/overrides.yaml), if it has them."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        return []
    return [str(o) for o in saved or [] if not override_key(str(o)).startswith((RESUME_KEY, "hydra"))]


def newest_run(name: str, outputs: Path = Path("outputs")) -> Path:
    """resume=last: the newest run dir of experiment `name` (outputs/<name>/<date>_<time>) holding a checkpoint."""
    root = outputs / name
    runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime_ns, reverse=True)
    for run in runs:
        if checkpoints_in(run):
            return run
        log.info("resume=last: skipping %s (no checkpoint)", run)
    raise TransferError(f"resume=last found no run of experiment '{name}' with a checkpoint under {root}",
                        "start a run first (transfer train experiment=...), run from the folder that holds outputs/, "
                        "or pick another experiment: transfer train resume=last experiment=NAME")


def load_resumable(ref: str | Path) -> tuple[Path, dict]:
    """The checkpoint to resume from and its content. A run dir means its last.ckpt; an unreadable one is skipped,
    with a warning, for the newest readable checkpoint of the run."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve(), read_checkpoint(path)
    first = resolve_checkpoint(path, prefer="last")  # errors clearly when the dir holds no checkpoint at all
    tried: list[str] = []
    for candidate in [first] + [p for p in checkpoints_in(path) if p.resolve() != first]:
        if not is_whole(candidate):
            tried.append(f"{candidate.name}: cut short")
            continue
        try:
            return candidate.resolve(), read_checkpoint(candidate)
        except TransferError as err:
            log.warning("skipping %s: %s", candidate, err.message)
            tried.append(f"{candidate.name}: {err.message.split(': ', 1)[-1]}")
    raise TransferError(f"no readable checkpoint in {path} ({'; '.join(tried) or 'none found'})",
                        "start a new run (transfer train ... without resume=); a checkpoint that carries code can "
                        "still seed one: model.weights=<that .ckpt> explains how")


def _select_run(ref: str, selectors: list[str]) -> Path:
    if ref != "last":
        if selectors:
            raise TransferError(f"{', '.join(selectors)} only pick the run for resume=last",
                                f"drop them: {resume_command(ref)}")
        return Path(ref)
    from transfer_cli.config.compose import compose

    name = compose(selectors).name  # the experiment's name decides outputs/<name>/
    return newest_run(name)


def _apply(cfg: Any, parsed: list[Any], ckpt: Path) -> None:
    from omegaconf import OmegaConf

    from transfer_cli.config.schema import structured_schema

    for ov in parsed:
        OmegaConf.update(cfg, ov.key_or_group, ov.value(), force_add=True)
    try:  # the schema still types every key: trainer.max_epochs=ten fails here, with the key named
        OmegaConf.merge(structured_schema(), cfg)
    except Exception as e:
        raise TransferError(f"the resumed config does not validate: {e}".splitlines()[0],
                            f"check the overrides' types, e.g. {resume_command(run_dir_of(ckpt))} trainer.max_epochs=20")


def plan_resume(ref: str, overrides: list[str]) -> ResumePlan:
    """Resolve `resume=<ref>` with the other command-line overrides; reject any that a resume cannot honour."""
    from hydra.core.override_parser.types import OverrideType

    hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra.") or o.lstrip("+~").startswith("hydra/")]
    rest = [o for o in overrides if o not in hydra_overrides and not o.lstrip("+~").startswith(RESUME_KEY + "=")]
    for o in hydra_overrides:
        if o.lstrip("+~").startswith(("hydra.run.dir", "hydra.sweep", "hydra.mode")):
            raise TransferError(f"'{o}' cannot be set when resuming: the run continues in its own run dir",
                                f"drop it: {resume_command(ref)}")
    if any(o in ("-m", "--multirun") for o in rest):
        raise TransferError("resume continues one run; it cannot be part of a sweep (-m)",
                            f"resume each run on its own: {resume_command(ref)}")
    parsed = _parse([o for o in rest if "=" in o])
    selectors = [f"{ov.key_or_group}={ov.value()}" for ov in parsed if ov.key_or_group in SELECTORS]
    parsed = [ov for ov in parsed if ov.key_or_group not in SELECTORS]

    run_ref = _select_run(ref, selectors)
    ckpt, content = load_resumable(run_ref)
    run_dir = run_dir_of(ckpt)
    if isinstance(content.get(CHECKPOINT_KEY), dict) and SOUP_KEY in content[CHECKPOINT_KEY]:
        raise TransferError(f"{ckpt} is a weight soup (transfer soup), not a run that stopped: it has no optimizer "
                            "state or data position to continue from",
                            f"start a new run from its weights: transfer train ... model.weights={shlex.quote(str(ckpt))}")
    for ov in parsed:
        key = ov.key_or_group
        if key == "logger":  # the group would replace every flag, also those the run was started with
            raise TransferError("logger=... cannot be given when resuming; the run keeps its trackers",
                                f"switch one on or off by its key: {resume_command(ref)} logger.mlflow=true")
        if ov.type == OverrideType.DEL or ov.is_sweep_override() or not _safe(key):
            new_run = " ".join(shlex.quote(o) for o in later_wins([*original_overrides(run_dir), *rest]))
            # The weights fit only the network they trained: a change to the model starts from scratch.
            start = "" if key.startswith("model.") else f" model.weights={shlex.quote(str(ckpt))}"
            what = "a new run" if start == "" else "a new run from its weights"
            raise TransferError(
                f"'{key}' cannot change when resuming: a resumed run continues with the config it was trained with "
                f"(it may change only {', '.join(SAFE_ON_RESUME)})",
                f"start {what} instead: transfer train {new_run}{start}".replace("  ", " "),
            )
    cfg = checkpoint_config(content)
    cfg.paths.output_dir = str(run_dir)  # the run dir as it is now (it may have been moved or copied)
    cfg[RESUME_KEY] = str(ckpt)
    _apply(cfg, parsed, ckpt)
    accepted = [f"{ov.key_or_group}={ov.value()}" for ov in parsed]
    log.info("resuming %s from %s%s", run_dir, ckpt.name, f" with {' '.join(accepted)}" if accepted else "")
    return ResumePlan(run_dir, ckpt, cfg, accepted, hydra_overrides)


def resume_target(overrides: list[str]) -> tuple[str, list[str]]:
    """(the resume= value, the other overrides) from a `transfer train` command line."""
    ref, rest = take(overrides, RESUME_KEY)
    if not ref or ref in ("null", "None"):
        raise TransferError("resume= needs a run dir, a .ckpt file or 'last'",
                            "transfer train resume=outputs/<name>/<date>_<time>  (or resume=last)")
    return ref, rest


@contextmanager
def resume_launch(args: list[str]) -> Iterator[list[str]]:
    """Hydra arguments that run the planned resume: the checkpoint's config (with the accepted overrides) as the
    primary config, typed by the schema, in the run's own dir. Hydra's .hydra/ record of the original launch is
    left as it was (output_subdir=null); config.yaml in the run dir is rewritten by train() as usual."""
    import yaml
    from omegaconf import OmegaConf

    ref, rest = resume_target(args)
    plan = plan_resume(ref, rest)
    body = OmegaConf.to_container(plan.config, resolve=True)
    with tempfile.TemporaryDirectory(prefix="transfer-resume-") as tmp:
        document = {"defaults": ["train_schema", {"hydra": "default"}, "_self_"], **body}
        (Path(tmp) / "resume.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        yield ["--config-dir", tmp, "--config-name", "resume", f"hydra.run.dir={plan.run_dir}",
               "hydra.output_subdir=null", *plan.hydra_overrides]


__all__ = ["plan_resume", "resume_launch", "ResumePlan", "resume_command", "is_resume", "resume_target",
           "load_resumable", "newest_run", "SAFE_ON_RESUME", "RESUME_KEY"]
