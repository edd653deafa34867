"""The CIFAR distillation-benchmark family: names, parameter counts against the published table, taps."""

from __future__ import annotations

import pytest
import torch

from kd_cluster.models import CIFAR_MODELS, ModelError, TappedModel, build_model, check_model_name, count_parameters

# Parameter counts (millions, 100 classes) as published in the CRD paper's benchmark table (Tian et al.,
# ICLR 2020) / its repository (HobbitLong/RepDistiller); they are given there to two decimals, so a
# count must round to the same figure (tolerance 0.005M + 0.5%).
PUBLISHED_M = {"resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86, "wrn_16_2": 0.70,
               "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46, "mobilenetv2": 0.81}


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_counts_match_the_published_table(name: str) -> None:
    n = count_parameters(build_model(f"cifar:{name}", num_classes=100, in_chans=3)) / 1e6
    assert n == pytest.approx(PUBLISHED_M[name], abs=0.005 + 0.005 * PUBLISHED_M[name])


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_runs_on_cifar_and_on_28px_digits(name: str) -> None:
    m = build_model(f"cifar:{name}", num_classes=100)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    m = build_model(f"cifar:{name}", num_classes=10, in_chans=1)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_names_prefix_and_bare() -> None:
    assert type(build_model("resnet8x4", num_classes=100, in_chans=3)).__name__ == "CifarResNet"
    assert type(build_model("cifar:vgg13", num_classes=100)).__name__ == "CifarVGG"
    # bare vgg13 is torchvision's ImageNet network, not the CIFAR one
    assert type(build_model("vgg13", num_classes=100)).__name__ == "VGG"
    with pytest.raises(ModelError, match=r"did you mean: cifar:vgg13"):
        check_model_name("cifar_vgg13")
    with pytest.raises(ModelError, match=r"did you mean: .*cifar:resnet8x4"):
        check_model_name("resnet8x")


@pytest.mark.parametrize(("name", "taps", "shapes"), [
    ("resnet8x4", ["layer1", "layer2", "layer3", "flatten"], [(256 // 4, 32), (128, 16), (256, 8), (256,)]),
    ("wrn_40_2", ["block1", "block2", "block3", "flatten"], [(32, 32), (64, 16), (128, 8), (128,)]),
    ("vgg8", ["block1", "block2", "block3", "block4"], [(128, 16), (256, 8), (512, 4), (512, 4)]),
    ("mobilenetv2", ["blocks.1", "blocks.2", "blocks.4", "blocks.6"], [(12, 16), (16, 8), (48, 4), (160, 2)]),
])
def test_feature_taps_have_the_stage_shapes(name: str, taps: list[str], shapes: list[tuple[int, ...]]) -> None:
    tapped = TappedModel(build_model(f"cifar:{name}", num_classes=100), taps)
    _, feats = tapped(torch.randn(2, 3, 32, 32))
    for tap, shape in zip(taps, shapes, strict=True):
        f = feats[tap]
        assert f.shape[1] == shape[0]
        if len(shape) == 2:
            assert f.shape[2:] == (shape[1], shape[1])
        else:
            assert f.ndim == 2
