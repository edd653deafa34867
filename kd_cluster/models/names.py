"""Model names known without importing torch, and how a name resolves (``check_model_name`` builds nothing,
so ``kd-cluster validate`` can check a job's models without torch for small CNNs and ``cifar:`` names;
a torchvision or timm name needs that library's registry, and so torch).

Resolution order for a name:

1. a small CNN (``cnn_xs``, ``cnn_s``, ``cnn_m``, ``cnn_l``);
2. ``cifar:<name>`` for the CIFAR distillation benchmark family (``cifar:resnet8x4``, ``cifar:vgg13``, ...,
   see :mod:`kd_cluster.models.cifar`);
3. a torchvision classification model (``torchvision.models.list_models(module=torchvision.models)``);
4. a bare CIFAR-family name that torchvision does not have (``resnet8x4``, ``wrn_40_2``; not ``vgg13``);
5. ``timm:<name>`` for any timm architecture (a ``.tag`` suffix is accepted and ignored);
6. a bare name that only timm knows.
"""

from __future__ import annotations

import difflib
from functools import cache

from kd_cluster.models.errors import ModelError

SMALL_NAMES = ("cnn_xs", "cnn_s", "cnn_m", "cnn_l")
"""The small CNNs (:data:`kd_cluster.models.small.SMALL_MODELS` has one constructor for each)."""
CIFAR_PREFIX = "cifar:"
CIFAR_NAMES = ("resnet8x4", "resnet32x4", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
               "resnet110", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "mobilenetv2")
"""The CIFAR family, without the prefix (:data:`kd_cluster.models.cifar.CIFAR_MODELS` has one constructor for each)."""

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
        "small": list(SMALL_NAMES),
        "cifar": [CIFAR_PREFIX + n for n in CIFAR_NAMES],
        "torchvision": list(_torchvision_names()),
        "timm": list(_timm_names()),
    }


def resolve(name: str) -> tuple[str, str]:
    """(source, name within that source) for a model name, or ModelError."""
    if not isinstance(name, str):
        raise ModelError(f"model name must be a string, got {type(name).__name__} {name!r}")
    if name in SMALL_NAMES:
        return "small", name
    if name.startswith(CIFAR_PREFIX) and name[len(CIFAR_PREFIX):] in CIFAR_NAMES:
        return "cifar", name[len(CIFAR_PREFIX):]
    if name in _torchvision_names():
        return "torchvision", name
    if name in CIFAR_NAMES:
        return "cifar", name
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        if _is_timm_model(timm_name):
            return "timm", timm_name
    elif _is_timm_model(name):
        return "timm", name
    raise ModelError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    small = list(SMALL_NAMES)
    tv = list(_torchvision_names())
    timm_names = list(_timm_names())
    cifar = [CIFAR_PREFIX + n for n in CIFAR_NAMES]
    if name.startswith(TIMM_PREFIX):
        bare = name[len(TIMM_PREFIX) :]
        close = [TIMM_PREFIX + n for n in difflib.get_close_matches(bare, timm_names, n=5, cutoff=0.6)]
    elif name.startswith(CIFAR_PREFIX):
        close = difflib.get_close_matches(name, cifar, n=5, cutoff=0.6)
    else:
        close = difflib.get_close_matches(name, cifar, n=3, cutoff=0.6) if "cifar" in name.lower() else []
        close += difflib.get_close_matches(name, small + tv, n=5, cutoff=0.6)
        close += [c for c in (CIFAR_PREFIX + n for n in difflib.get_close_matches(name, list(CIFAR_NAMES), n=3,
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

    Builds nothing, so it is cheap enough for config validation (and imports no torch for small CNNs and
    ``cifar:`` names).
    """
    resolve(name)


__all__ = ["CIFAR_NAMES", "CIFAR_PREFIX", "SMALL_NAMES", "TIMM_PREFIX", "available_models", "check_model_name",
           "resolve"]
