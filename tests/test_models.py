"""Tests of kd_cluster.models: building by name, weights over fsspec (local and S3), feature taps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_cluster.models import (
    SMALL_MODELS,
    ModelError,
    TappedModel,
    available_models,
    build_model,
    check_model_name,
    count_parameters,
    feature_node_names,
    load_weights,
    save_weights,
)

# ---------------------------------------------------------------------------------------------------
# small CNNs: every registry entry, so a new entry is tested without touching this file


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_small_cnn_forward_backward(name: str, in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_chans=in_chans)
    x = torch.randn(2, in_chans, size, size)
    logits = model(x)
    assert logits.shape == (2, 10)
    nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_small_cnn_has_readable_tap_names(name: str) -> None:
    names = feature_node_names(build_model(name, num_classes=10, in_chans=1))
    assert names[-1] == "head"
    for stage in ("stage1", "stage2", "stage3"):
        assert any(n.startswith(stage + ".") for n in names), (stage, names)


def test_small_cnns_grow_in_size() -> None:
    counts = [count_parameters(build_model(n, num_classes=10, in_chans=1)) for n in ("cnn_xs", "cnn_s", "cnn_m", "cnn_l")]
    assert counts == sorted(counts) and len(set(counts)) == 4


# ---------------------------------------------------------------------------------------------------
# torchvision and timm


def test_torchvision_resnet18_one_channel() -> None:
    model = build_model("resnet18", num_classes=10, in_chans=1).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_torchvision_other_in_chans() -> None:
    model = build_model("resnet18", num_classes=10, in_chans=4)
    assert model.conv1.weight.shape == (64, 4, 7, 7)
    assert torch.isfinite(model.conv1.weight).all()


def test_aux_heads_are_off() -> None:
    model = build_model("googlenet", num_classes=10).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_timm_model_builds() -> None:
    model = build_model("timm:resnetv2_50x1_bit", num_classes=10).eval()
    # ~23.5M in the backbone + 2048*10+10 in the head (25.5M with the 1000-class head).
    assert 22_000_000 < count_parameters(model) < 25_000_000
    with torch.no_grad():  # ~0.1 s on 2 CPU cores at 64 px
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_bare_timm_name_and_tag_accepted() -> None:
    check_model_name("resnetv2_50x1_bit")  # only timm knows it
    check_model_name("timm:resnet50.a1_in1k")  # a pretrained tag is allowed (and unused)
    assert set(available_models()) == {"small", "cifar", "torchvision", "timm"}


def test_available_models() -> None:
    models = available_models()
    assert models["small"] == list(SMALL_MODELS)
    assert {"resnet18", "resnet50"} <= set(models["torchvision"])
    assert "fasterrcnn_resnet50_fpn" not in models["torchvision"]  # classification only
    assert "resnetv2_50x1_bit" in models["timm"]


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet5", num_classes=10)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "unknown model 'resnet5'" in message
    assert "did you mean: resnet50" in message and "resnet18" in message
    assert "cnn_xs" in message and "timm:" in message


def test_unknown_timm_name_suggests_timm_names() -> None:
    with pytest.raises(ModelError, match="timm:resnetv2_50x1_bit"):
        check_model_name("timm:resnetv2_50x1_bt")
    with pytest.raises(ModelError, match="unknown model"):
        check_model_name("timm:hf-hub:someone/model")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_chans": 0}, {"num_classes": 2.5}])
def test_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ModelError, match="positive integer"):
        build_model("cnn_xs", **kwargs)


def test_count_parameters_matches_published() -> None:
    assert count_parameters(build_model("resnet18", num_classes=1000)) == 11_689_512
    assert count_parameters(build_model("resnet50", num_classes=1000)) == 25_557_032


# ---------------------------------------------------------------------------------------------------
# weights


def _trained_cnn(name: str = "cnn_s", seed: int = 0) -> nn.Module:
    """A small CNN whose BN running statistics are no longer the defaults."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_chans=3)
    model(torch.randn(4, 3, 32, 32))
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_round_trip(tmp_path: Path) -> None:
    src, dst = _trained_cnn(seed=0), _trained_cnn(seed=1)
    uri = str(tmp_path / "nested" / "dir" / "student.safetensors")
    save_weights(src, uri)
    assert [p.name for p in (tmp_path / "nested" / "dir").iterdir()] == ["student.safetensors"]  # no temp file left
    load_weights(dst, uri)
    _assert_same_state(src, dst)


@pytest.mark.parametrize(
    ("nest", "prefix"),
    [("model", "module."), ("state_dict", "_orig_mod."), ("student", "module._orig_mod."), (None, "")],
)
def test_torch_checkpoint_round_trip(tmp_path: Path, nest: str | None, prefix: str) -> None:
    src, dst = _trained_cnn(seed=0), _trained_cnn(seed=1)
    state = {prefix + k: v for k, v in src.state_dict().items()}
    uri = str(tmp_path / "ckpt.pt")
    torch.save({nest: state, "step": 7, "optimizer": {"lr": 0.1}} if nest else state, uri)
    load_weights(dst, uri)
    _assert_same_state(src, dst)


def test_tied_weights_save(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    src, dst = Tied(), Tied()
    save_weights(src, str(tmp_path / "tied.safetensors"))
    load_weights(dst, str(tmp_path / "tied.safetensors"))
    assert torch.equal(dst.a.weight, src.a.weight) and torch.equal(dst.b.bias, src.b.bias)


def test_mismatched_weights_name_keys(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.safetensors")
    save_weights(_trained_cnn("cnn_s"), uri)
    with pytest.raises(ModelError) as info:
        load_weights(build_model("cnn_m", num_classes=10), uri)
    message = str(info.value)
    assert uri in message
    assert "missing keys" in message and "stage1.1.conv.weight" in message
    assert "shape mismatches" in message and "stage1.0.conv.weight" in message

    state = _trained_cnn("cnn_s").state_dict()
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match=r"1 missing keys: head\.bias; 1 unexpected keys: extra\.weight"):
        load_weights(build_model("cnn_s", num_classes=10), str(tmp_path / "partial.pt"))

    save_weights(build_model("cnn_s", num_classes=5), uri)
    with pytest.raises(ModelError, match=r"head\.weight: file \(5, 64\) vs model \(10, 64\)"):
        load_weights(build_model("cnn_s", num_classes=10), uri)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    model = build_model("cnn_xs", num_classes=10)
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="weights not found at .*nope.safetensors"):
        load_weights(model, missing)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_weights(model, str(tmp_path / "junk.pt"))
    torch.save({"epoch": 3}, tmp_path / "no_state.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        load_weights(model, str(tmp_path / "no_state.pt"))
    with pytest.raises(ModelError, match="must end in '.safetensors'"):
        save_weights(model, str(tmp_path / "w.pt"))


@pytest.fixture(scope="module")
def s3_endpoint(s3) -> str:
    """The session's local S3 server with bucket 'kd-models'; yields its URL."""
    s3.bucket("kd-models")
    return s3.endpoint


def test_s3_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    src, dst = _trained_cnn(seed=0), _trained_cnn(seed=1)
    save_weights(src, "s3://kd-models/runs/a/student.safetensors", storage_options=options)
    load_weights(dst, "s3://kd-models/runs/a/student.safetensors", storage_options=options)
    _assert_same_state(src, dst)

    # a torch checkpoint put there by someone else
    import fsspec

    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "c.pt")
    with fsspec.open("s3://kd-models/runs/b/ckpt.pt", "wb", **options) as f:
        f.write((tmp_path / "c.pt").read_bytes())
    third = _trained_cnn(seed=2)
    load_weights(third, "s3://kd-models/runs/b/ckpt.pt", storage_options=options)
    _assert_same_state(src, third)

    with pytest.raises(ModelError, match="weights not found at 's3://kd-models/runs/none.safetensors'"):
        load_weights(dst, "s3://kd-models/runs/none.safetensors", storage_options=options)
    with pytest.raises(ModelError, match="cannot write weights to 's3://no-such-bucket/w.safetensors'"):
        save_weights(dst, "s3://no-such-bucket/w.safetensors", storage_options=options)


# ---------------------------------------------------------------------------------------------------
# feature taps


def test_tapped_small_cnn_shapes_and_logits() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_s", num_classes=10, in_chans=3)
    taps = ["stage1", "stage2", "stage3.0.relu", "pool", "head"]
    tapped = TappedModel(model, taps)
    x = torch.randn(2, 3, 32, 32)
    logits, feats = tapped(x)
    assert logits.shape == (2, 10)
    assert list(feats) == taps
    assert feats["stage1"].shape == (2, 16, 32, 32)
    assert feats["stage2"].shape == (2, 32, 16, 16)
    assert feats["stage3.0.relu"].shape == (2, 64, 8, 8)
    assert feats["pool"].shape == (2, 64, 1, 1)
    assert torch.equal(feats["head"], logits)

    # gradients flow into the shared parameters through both logits and features
    (logits.sum() + feats["stage2"].mean()).backward()
    assert model.stage1[0].conv.weight.grad is not None

    # eval mode: same logits as the bare model
    tapped.eval()
    assert not model.training
    with torch.no_grad():
        logits, feats = tapped(x)
        assert torch.allclose(logits, model(x))
        assert feats["stage1"].shape == (2, 16, 32, 32)


def test_tapped_keeps_the_model_mode() -> None:
    teacher = build_model("cnn_s", num_classes=10).eval()
    tapped = TappedModel(teacher, ["stage3"])
    assert not tapped.training and not teacher.training
    assert not any(m.training for m in teacher.modules())
    tapped.train()
    assert all(m.training for m in teacher.modules())


def test_tapped_state_dict_and_weights(tmp_path: Path) -> None:
    model = _trained_cnn("cnn_s")
    tapped = TappedModel(model, ["stage2"])
    assert set(tapped.state_dict()) == {"model." + k for k in model.state_dict()}
    assert count_parameters(tapped) == count_parameters(model)
    save_weights(tapped, str(tmp_path / "t.safetensors"))
    fresh = build_model("cnn_s", num_classes=10)
    load_weights(fresh, str(tmp_path / "t.safetensors"))
    _assert_same_state(model, fresh)


def test_tapped_torchvision_resnet() -> None:
    tapped = TappedModel(build_model("resnet18", num_classes=10, in_chans=1), ["layer3", "layer4.1.relu_1"]).eval()
    with torch.no_grad():
        logits, feats = tapped(torch.randn(1, 1, 64, 64))
    assert logits.shape == (1, 10)
    assert feats["layer3"].shape == (1, 256, 4, 4)
    assert feats["layer4.1.relu_1"].shape == (1, 512, 2, 2)


def test_weights_look_through_wrappers(tmp_path: Path) -> None:
    model = _trained_cnn("cnn_s")
    wrapped = nn.DataParallel(TappedModel(model, ["stage2"]))  # "module.model." prefixes in its state dict
    save_weights(wrapped, str(tmp_path / "w.safetensors"))
    fresh = build_model("cnn_s", num_classes=10)
    load_weights(fresh, str(tmp_path / "w.safetensors"))
    _assert_same_state(model, fresh)
    other = nn.DataParallel(TappedModel(build_model("cnn_s", num_classes=10), ["stage1"]))
    load_weights(other, str(tmp_path / "w.safetensors"))
    _assert_same_state(model, other.module.model)


def test_unknown_tap_lists_existing_names() -> None:
    model = build_model("cnn_s", num_classes=10)
    with pytest.raises(ModelError) as info:
        TappedModel(model, ["stage1", "stag2"])
    message = str(info.value)
    assert "unknown feature tap 'stag2'" in message
    assert "close matches: stage2" in message
    for name in ("stage1", "stage3", "pool", "head"):
        assert name in message
    with pytest.raises(ModelError, match="list of layer names"):
        TappedModel(model, "stage1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# layering


def test_models_import_no_ray_wandb_or_other_layers() -> None:
    code = (
        "import sys, kd_cluster.models\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'wandb')"
        " or (m.startswith('kd_cluster.') and not m.startswith('kd_cluster.models'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
