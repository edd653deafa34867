"""Build a classifier by name: our small CNNs, the CIFAR family, torchvision classification models, timm
models. How a name resolves is :mod:`kd_cluster.models.names`. Models are always randomly initialised;
weights come from ``load_weights``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kd_cluster.models.cifar import CIFAR_MODELS
from kd_cluster.models.errors import ModelError
from kd_cluster.models.names import available_models, check_model_name, resolve  # noqa: F401  (re-exported)
from kd_cluster.models.small import SMALL_MODELS

def build_model(name: str, *, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Build a randomly initialised classifier ``name`` with ``num_classes`` outputs and ``in_chans`` inputs.

    See the module docstring for how names resolve. Never loads pretrained weights. For a torchvision
    model with ``in_chans != 3`` the first 3-channel conv is replaced by one with ``in_chans`` inputs,
    its initial weights adapted from the model's own (summed for 1 channel, tiled and rescaled otherwise).
    Every model returned maps a batch of images to a logits tensor (googlenet and inception_v3 are built
    without their auxiliary heads).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"in_chans must be a positive integer, got {in_chans!r}")
    source, resolved = resolve(name)
    if source == "small":
        return SMALL_MODELS[resolved](num_classes=num_classes, in_chans=in_chans)
    if source == "cifar":
        return CIFAR_MODELS[resolved](num_classes=num_classes, in_chans=in_chans)
    if source == "torchvision":
        return _build_torchvision(resolved, num_classes=num_classes, in_chans=in_chans)
    import timm

    return timm.create_model(resolved, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _build_torchvision(name: str, *, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision

    # Auxiliary heads would make forward() return a namedtuple in train mode; every model we build
    # returns logits only. init_weights=True keeps torchvision's current init and silences its warning.
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    except (ValueError, TypeError) as exc:  # e.g. models that fix num_classes or need other arguments
        raise ModelError(f"torchvision model {name!r} cannot be built with num_classes={num_classes}: {exc}") from exc
    if in_chans != 3:
        _replace_first_conv(model, name, in_chans)
    return model


def _replace_first_conv(model: nn.Module, name: str, in_chans: int) -> None:
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            break
    else:
        raise ModelError(f"torchvision model {name!r} has no 3-channel Conv2d to adapt; use in_chans=3")
    conv = nn.Conv2d(
        in_chans,
        module.out_channels,
        kernel_size=module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    with torch.no_grad():
        conv.weight.copy_(_adapt_input_weight(module.weight, in_chans))
        if module.bias is not None:
            conv.bias.copy_(module.bias)  # type: ignore[union-attr]
    parent_name, _, child_name = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, conv)


def _adapt_input_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The model's own random init of a 3-channel conv, adapted to ``in_chans`` (the convention timm uses)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not; shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
