"""Build a classifier by name: our small CNNs, torchvision classification models, timm models.

Resolution order for a name:

1. a small CNN (``cnn_xs``, ``cnn_s``, ``cnn_m``, ``cnn_l``);
2. ``cifar:<name>`` for the CIFAR distillation benchmark family (``cifar:resnet8x4``, ``cifar:vgg13``, ...,
   see :mod:`kd_cluster.models.cifar`);
3. a torchvision classification model (``torchvision.models.list_models(module=torchvision.models)``);
4. a bare CIFAR-family name that torchvision does not have (``resnet8x4``, ``wrn_40_2``; not ``vgg13``);
5. ``timm:<name>`` for any timm architecture (a ``.tag`` suffix is accepted and ignored);
6. a bare name that only timm knows.

Models are always randomly initialised; weights come from ``load_weights``.
"""

from __future__ import annotations

import difflib
import math
from functools import cache

import torch
from torch import nn

from kd_cluster.models.cifar import CIFAR_MODELS, CIFAR_PREFIX
from kd_cluster.models.errors import ModelError
from kd_cluster.models.small import SMALL_MODELS

TIMM_PREFIX = "timm:"


@cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _is_timm_model(name: str) -> bool:
    import timm

    # is_model() strips a ".tag" suffix (e.g. "resnet50.a1_in1k"); hub names ("hf-hub:...") are refused.
    return ":" not in name and timm.is_model(name)


def available_models() -> dict[str, list[str]]:
    """Every model name ``build_model`` accepts, by source.

    Returns ``{"small": [...], "cifar": [...], "torchvision": [...], "timm": [...]}``; CIFAR names are
    given with their ``cifar:`` prefix; timm names are given bare and are built as ``"timm:<name>"``
    (or bare, where no small CNN or torchvision model has the name).
    """
    return {
        "small": list(SMALL_MODELS),
        "cifar": [CIFAR_PREFIX + n for n in CIFAR_MODELS],
        "torchvision": list(_torchvision_names()),
        "timm": list(_timm_names()),
    }


def _resolve(name: str) -> tuple[str, str]:
    """(source, name within that source) for a model name, or ModelError."""
    if not isinstance(name, str):
        raise ModelError(f"model name must be a string, got {type(name).__name__} {name!r}")
    if name in SMALL_MODELS:
        return "small", name
    if name.startswith(CIFAR_PREFIX) and name[len(CIFAR_PREFIX):] in CIFAR_MODELS:
        return "cifar", name[len(CIFAR_PREFIX):]
    if name in _torchvision_names():
        return "torchvision", name
    if name in CIFAR_MODELS:
        return "cifar", name
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        if _is_timm_model(timm_name):
            return "timm", timm_name
    elif _is_timm_model(name):
        return "timm", name
    raise ModelError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    small = list(SMALL_MODELS)
    tv = list(_torchvision_names())
    timm_names = list(_timm_names())
    cifar = [CIFAR_PREFIX + n for n in CIFAR_MODELS]
    if name.startswith(TIMM_PREFIX):
        bare = name[len(TIMM_PREFIX) :]
        close = [TIMM_PREFIX + n for n in difflib.get_close_matches(bare, timm_names, n=5, cutoff=0.6)]
    elif name.startswith(CIFAR_PREFIX):
        close = difflib.get_close_matches(name, cifar, n=5, cutoff=0.6)
    else:
        close = difflib.get_close_matches(name, cifar, n=3, cutoff=0.6) if "cifar" in name.lower() else []
        close += difflib.get_close_matches(name, small + tv, n=5, cutoff=0.6)
        close += [c for c in (CIFAR_PREFIX + n for n in difflib.get_close_matches(name, list(CIFAR_MODELS), n=3,
                                                                                   cutoff=0.75)) if c not in close]
        if len(close) < 5:
            close += [
                TIMM_PREFIX + n
                for n in difflib.get_close_matches(name, timm_names, n=5 - len(close), cutoff=0.6)
                if n not in close
            ]
    examples = [n for n in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16") if n in tv]
    message = (
        f"unknown model {name!r}; small CNNs: {', '.join(small)}; "
        f"CIFAR family: {', '.join(cifar)}; "
        f"torchvision: e.g. {', '.join(examples)}, ... ({len(tv)} models); "
        f"timm: prefix with {TIMM_PREFIX!r} (e.g. timm:resnetv2_50x1_bit; {len(timm_names)} models)"
    )
    if close:
        message += f"; did you mean: {', '.join(close)}?"
    return message


def check_model_name(name: str) -> None:
    """Raise ModelError if ``build_model`` does not know ``name``; the message suggests close names.

    Builds nothing, so it is cheap enough for config validation.
    """
    _resolve(name)


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
    source, resolved = _resolve(name)
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
