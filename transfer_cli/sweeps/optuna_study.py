"""Continuing an Optuna study from its SQLite file: `n_trials` counts the study's trials, not this session's.

The Optuna sweeper always asks for `n_trials` new trials, so re-running an interrupted search would overshoot.
Before the sweeper starts, the sweep callback asks here how many are left. Trials left RUNNING by a session that
was killed are marked failed and their parameters queued again, so the interrupted trial is the first one re-run.
That assumes one process drives the study at a time (which is how `transfer train -m hparams_search=optuna` runs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("transfer_cli.sweeps")
SQLITE = "sqlite:///"


def trials_left(sweeper_cfg: Any) -> int:
    wanted = int(sweeper_cfg.n_trials)
    storage, name = sweeper_cfg.storage, sweeper_cfg.study_name
    if not storage or not name:
        return wanted  # an in-memory or unnamed study cannot be continued: nothing to count
    storage = str(storage)
    if storage.startswith(SQLITE):
        db = Path(storage[len(SQLITE):])
        db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        if not db.is_file():
            return wanted
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=str(name), storage=storage)
    except KeyError:  # the storage exists but holds no study of that name yet
        return wanted
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    stale = [t for t in study.trials if t.state == TrialState.RUNNING]
    for trial in stale:
        _mark_failed(study, trial)
        if trial.params:
            study.enqueue_trial(trial.params)
    left = max(0, wanted - len(finished))
    log.info("optuna study %r: %d of %d trials finished, %d interrupted (re-queued); running %d more",
             name, len(finished), wanted, len(stale), left)
    return left


def _mark_failed(study: Any, trial: Any) -> None:
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL)  # closes a trial another process left running
