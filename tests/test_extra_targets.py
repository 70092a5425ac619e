"""Extra Lightning callbacks and loggers as `_target_` nodes on the command line (+callbacks.extra.NAME,
+logger.extra.NAME), instantiated by Hydra beside the ones the config groups build."""

from __future__ import annotations

import csv

import pytest
from conftest import tiny_cfg

from transfer_cli.config.compose import as_schema
from transfer_cli.errors import TransferError
from transfer_cli.train import train

EPOCH_LOOP = ("transfer=fine_tune", "augmentation=none", "trainer.max_epochs=1")


def test_an_extra_callback_and_logger_run_beside_the_configured_ones(tmp_path, tiny_imagefolder):
    extra_ckpts, extra_logs = tmp_path / "extra_ckpts", tmp_path / "extra_logs"
    summary = train(tiny_cfg(
        tmp_path, tiny_imagefolder, *EPOCH_LOOP,
        "+callbacks.extra.snapshot._target_=pytorch_lightning.callbacks.ModelCheckpoint",
        f"+callbacks.extra.snapshot.dirpath={extra_ckpts}", "+callbacks.extra.snapshot.filename=snapshot",
        "+callbacks.extra.snapshot.every_n_train_steps=1",  # a state key of its own beside last.ckpt's
        "+logger.extra.more._target_=pytorch_lightning.loggers.CSVLogger",
        f"+logger.extra.more.save_dir={extra_logs}", "+logger.extra.more.name=more"))
    assert (extra_ckpts / "snapshot.ckpt").is_file()  # the extra callback ran
    assert summary["last_checkpoint"] and (tmp_path / "run" / "metrics.csv").is_file()  # and the usual ones too
    with open(extra_logs / "more" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and any(r.get("train/loss_epoch") for r in rows)  # the extra logger got the run's metrics


def test_a_node_without_target_is_refused_before_torch(tmp_path, tiny_imagefolder):
    with pytest.raises(TransferError, match="has no _target_") as err:
        as_schema(tiny_cfg(tmp_path, tiny_imagefolder, "+callbacks.extra.timer.duration=10"))
    assert "+callbacks.extra.timer._target_=" in err.value.fix


def test_a_target_of_the_wrong_kind_is_refused_with_the_fix(tmp_path, tiny_imagefolder):
    with pytest.raises(TransferError, match="is not a Lightning Callback"):
        train(tiny_cfg(tmp_path, tiny_imagefolder, *EPOCH_LOOP,
                       "+callbacks.extra.odd._target_=pytorch_lightning.loggers.CSVLogger",
                       f"+callbacks.extra.odd.save_dir={tmp_path}"))
    with pytest.raises(TransferError, match="could not be made"):
        train(tiny_cfg(tmp_path, tiny_imagefolder, *EPOCH_LOOP, "+logger.extra.x._target_=no.such.Logger"))
