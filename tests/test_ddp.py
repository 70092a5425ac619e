"""trainer=ddp through the real CLI: 2 CPU processes (gloo), Lightning re-launching `transfer train` for rank 1."""


import pytest
import torch
from conftest import transfer

from transfer_cli.config.compose import compose
from transfer_cli.train import train

COMMON = ["~experiment", "data=imagefolder", "model.backbone=test_efficientnet", "model.pretrained=false",
          "transfer=fine_tune", "trainer.max_epochs=2", "data.num_workers=0", "data.image_size=32",
          "callbacks.rich_progress=false", "trainer.enable_progress_bar=false"]


def global_step(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_ddp_sweep_takes_the_steps_of_one_process_with_the_same_global_batch(tmp_path, tiny_imagefolder):
    single = train(compose([*COMMON, f"data.root={tiny_imagefolder}", "trainer=cpu", "data.batch_size=8",
                            f"paths.output_dir={tmp_path / 'single'}"]))
    # 16 training images, a global batch of 8: 2 steps an epoch, 4 in all.
    assert global_step(tmp_path / "single") == 4 and single["epochs"] == 2

    # Two jobs of a sweep, each on 2 processes with 4 images per device: the second job must launch its own
    # rank 1 again (not hang on the first job's process group) and write into its own job dir only.
    sweep = tmp_path / "sweep"
    out = transfer("train", "-m", *COMMON, f"data.root={tiny_imagefolder}", "trainer=ddp", "trainer.accelerator=cpu",
                   "trainer.devices=2", "data.batch_size=4", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                   timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        assert global_step(sweep / job) == 4
        # rank 1 ran, as a single job in this job's dir (its own log), not a sweep of its own
        rank1_log = (sweep / job / "train_ddp_process_1.log").read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1_log
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    assert "2 ok" in (sweep / "sweep_summary.md").read_text()
