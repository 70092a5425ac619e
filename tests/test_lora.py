"""transfer=lora: peft's low-rank adapters train beside a frozen tiny ViT (and a tiny EfficientNet); the checkpoint
holds them; eval, predict and export see them merged into a plain timm network. Exact resume: test_resume.py."""

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import load_ckpt, tiny_cfg, transfer

from transfer_cli.assembly.run import build_run
from transfer_cli.config.resolve import resolve_run
from transfer_cli.errors import TransferError
from transfer_cli.models.adapters import is_adapter_param
from transfer_cli.train import train
from transfer_cli.training.audit import adapted_layers

LORA = ("transfer=lora", "transfer.lora_rank=4", "trainer.max_epochs=2", "optimizer.lr=1e-2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-epoch LoRA run on a tiny ViT; the backbone's tensors at fit start and the built run, for inspection."""
    from conftest import _make_image_folder

    base = tmp_path_factory.mktemp("lora")
    root = _make_image_folder(base / "data")
    cfg = resolve_run(tiny_cfg(base, root, *LORA, backbone="test_vit"))
    run = build_run(cfg, Path(cfg.paths.output_dir))
    start = {k: v.detach().clone() for k, v in run.model.backbone.state_dict().items()}
    head_start = {k: v.detach().clone() for k, v in run.model.head.state_dict().items()}
    summary = train(cfg)
    return base, root, cfg, run, start, head_start, summary


def test_only_the_adapters_and_the_head_train_and_the_audit_counts_them(lora_run):
    base, _, cfg, run, start, head_start, summary = lora_run
    trained = load_ckpt(summary["last_checkpoint"])["state_dict"]
    backbone = {k[len("model.backbone."):]: v for k, v in trained.items() if k.startswith("model.backbone.")}
    assert set(backbone) == set(start)
    adapters = {k for k in backbone if is_adapter_param(k)}
    assert adapters and all(".lora_A.default." in k or ".lora_B.default." in k for k in adapters)
    # every original tensor bitwise as it started; every B (zero at the start) has moved; so has the head
    assert all(torch.equal(backbone[k], start[k]) for k in backbone if k not in adapters)
    assert all(not torch.equal(backbone[k], start[k]) for k in adapters if ".lora_B." in k)
    assert all(not torch.equal(trained[f"model.head.{k}"], v) for k, v in head_start.items())

    # the default targets: every Linear of the transformer blocks, none in the stem (the patch embedding)
    layers = {k.split(".lora_")[0] for k in adapters}
    linears = {n for n, m in timm.create_model("test_vit", num_classes=0).named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert layers == {n for n in linears if n.startswith("blocks.")}
    audit = json.loads((Path(summary["run_dir"]) / "audit.json").read_text())["checks"][0]
    assert set(audit["adapted_layers"]) == layers
    rows = {r["stage"]: r for r in audit["stages"]}
    sizes = {k: v.numel() for k, v in backbone.items()}
    for stage in run.model.stages:
        assert rows[stage.name]["adapters"] == rows[stage.name]["trainable"] == sum(
            sizes[p] for p in stage.params if p in adapters)
    assert rows["stem"]["trainable"] == 0 and rows["head"]["adapters"] == 0
    # the optimizer holds the adapters at the head's LR (backbone_lr_scale 1) and nothing else of the backbone
    assert {float(lr) for r in audit["stages"] for lr in r["lr"]} == {cfg.optimizer.lr}


@pytest.mark.slow
def test_commands_see_the_adapters_merged_into_a_plain_timm_network(lora_run, tmp_path):
    from transfer_cli.commands.evaluate import evaluate
    from transfer_cli.commands.export import export
    from transfer_cli.commands.restore import restore

    base, root, cfg, run, _, _, summary = lora_run
    ckpt = summary["last_checkpoint"]
    restored = restore(ckpt)
    assert not any(is_adapter_param(n) or ".base_layer." in n for n, _ in restored.model.named_parameters())
    # the merged network computes what the adapted one computed in training
    state = load_ckpt(ckpt)["state_dict"]
    run.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        adapted, merged = run.model.eval()(images), restored.model(images)
    assert torch.allclose(adapted, merged, atol=1e-5), (adapted - merged).abs().max()

    # eval scores the best checkpoint's val split as training did: merged weights, same predictions
    report = evaluate(summary["best_checkpoint"], split="val", output=tmp_path / "eval")
    assert report["metrics"]["acc"] == pytest.approx(summary["val_acc"])
    for fmt in ("onnx", "timm"):
        result = export(ckpt, format=fmt, output=tmp_path / f"lora_{fmt}")
        assert result.agreement.close and result.agreement.top1_same == result.agreement.samples
    # timm's own loader takes the exported folder: the merged weights under timm's names
    model = timm.create_model(f"local-dir:{tmp_path / 'lora_timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(model(images), merged, atol=1e-5)


def test_conv_backbones_adapt_their_ungrouped_convolutions_and_keep_batchnorm_frozen(tmp_path, tiny_imagefolder):
    cfg = resolve_run(tiny_cfg(tmp_path, tiny_imagefolder, "transfer=lora", "transfer.lora_rank=2"))
    run = build_run(cfg, Path(cfg.paths.output_dir))
    run.module.freeze.apply(run.model, 0)
    modules = dict(run.model.backbone.named_modules())
    adapted = set(adapted_layers(run.model.backbone))
    assert adapted and all(modules[n].base_layer.groups == 1 for n in adapted)
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in modules.values())  # depthwise: untouched
    trainable = {n for n, p in run.model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in run.model.backbone.named_parameters() if is_adapter_param(n)}
    run.model.train()
    norms = [m for m in modules.values() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)  # frozen weights, fixed running statistics


def test_targets_are_chosen_by_regex_and_a_regex_that_matches_nothing_names_the_layers(tmp_path, tiny_imagefolder):
    cfg = resolve_run(tiny_cfg(tmp_path, tiny_imagefolder, "transfer=lora", "transfer.lora_targets=[attn.qkv]",
                               backbone="test_vit"))
    run = build_run(cfg, Path(cfg.paths.output_dir))
    adapted = set(adapted_layers(run.model.backbone))
    assert adapted and all(n.endswith("attn.qkv") for n in adapted)
    cfg = resolve_run(tiny_cfg(tmp_path, tiny_imagefolder, "transfer=lora", "transfer.lora_targets=[nothing_here]",
                               backbone="test_vit", run="run2"))
    with pytest.raises(TransferError) as err:
        build_run(cfg, Path(cfg.paths.output_dir))
    assert "nothing_here" in err.value.message and "blocks." in err.value.fix


def test_lora_on_own_data_takes_its_recipe_and_a_bad_rank_is_refused_before_torch(tmp_path, tiny_imagefolder):
    from transfer_cli.config.compose import compose, own_data_defaults

    cfg = compose(own_data_defaults([f"data.root={tiny_imagefolder}", "transfer=lora"]))
    assert cfg.name.endswith("_lora") and cfg.optimizer.weight_decay == 0 and cfg.transfer.backbone_lr_scale == 1
    out = transfer("train", "data=imagefolder", f"data.root={tiny_imagefolder}", "transfer=lora",
                   "transfer.lora_rank=0", f"paths.output_dir={tmp_path / 'run'}", probe=True)
    assert out.returncode == 2 and "transfer.lora_rank" in out.stderr and "fix:" in out.stderr
    assert "HEAVY []" in out.stderr and not (tmp_path / "run").exists()


def test_a_soup_of_adapter_runs_is_refused_with_the_ensemble_instead(lora_run, tmp_path):
    from transfer_cli.commands.soup import soup

    summary = lora_run[-1]
    with pytest.raises(TransferError) as err:
        soup([summary["last_checkpoint"], summary["best_checkpoint"]], output=tmp_path / "soup")
    assert "adapters" in err.value.message and "ckpt=[" in err.value.fix
