"""trainer.precision: one vocabulary. Every alias Lightning accepts resolves to the name a pl.Trainer reports for
it, and the trainer, the feature pre-pass, eval and predict autocast to the same dtype for each name."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from transfer_cli.config.compose import compose
from transfer_cli.config.resolve import resolve_run
from transfer_cli.inference import autocast_for
from transfer_cli.precision import ALIASES, canonical

CPU_PRECISIONS = ["32", "32-true", "64", "64-true", "bf16", "bf16-mixed", "bf16-true"]


@pytest.mark.parametrize("value", CPU_PRECISIONS)
def test_each_precision_resolves_to_the_name_lightning_reports(value):
    trainer = pl.Trainer(accelerator="cpu", precision=value, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert canonical(value) == trainer.precision


def test_the_aliases_are_lightnings():
    for alias, name in ALIASES.items():
        if name == "16-mixed":
            continue  # fp16 autocast needs CUDA
        trainer = pl.Trainer(accelerator="cpu", precision=alias, logger=False, enable_checkpointing=False)
        assert trainer.precision == name


def _autocast_dtype_inside(factory) -> torch.dtype:
    layer = torch.nn.Linear(4, 4)
    with factory():
        return layer(torch.zeros(1, 4)).dtype


@pytest.mark.parametrize("alias,name", [("bf16", "bf16-mixed"), ("32", "32-true"), ("bf16-mixed", "bf16-mixed")])
def test_a_run_config_carries_the_canonical_name_and_inference_autocasts_as_training(tmp_path, alias, name):
    cfg = resolve_run(compose(["~experiment", "trainer=cpu", f"trainer.precision={alias}",
                               f"paths.output_dir={tmp_path}"]))
    assert cfg.trainer.precision == name
    trainer = pl.Trainer(accelerator="cpu", precision=cfg.trainer.precision, logger=False)
    with trainer.precision_plugin.forward_context():  # how Lightning runs a training step's forward
        trained = torch.nn.Linear(4, 4)(torch.zeros(1, 4)).dtype
    assert _autocast_dtype_inside(autocast_for(torch.device("cpu"), alias)) == trained
    assert _autocast_dtype_inside(autocast_for(torch.device("cpu"), cfg.trainer.precision)) == trained


def test_an_unknown_precision_is_refused_before_torch_with_the_nearest_name():
    from transfer_cli.errors import TransferError

    with pytest.raises(TransferError, match="did you mean bf16-mixed"):
        resolve_run(compose(["~experiment", "trainer.precision=bf16-mix"]))
