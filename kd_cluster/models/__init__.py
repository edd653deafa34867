"""Models layer: build teachers/students by name, load/save weights over fsspec, feature taps; input
normalisation and the allocator settings every model-running process uses.

Sources of models: our small CNNs for 28-32 px inputs (``cnn_xs``, ``cnn_s``, ``cnn_m``, ``cnn_l``),
the CIFAR distillation-benchmark family (``"cifar:resnet8x4"``, ``"cifar:vgg13"``, ...), torchvision classification models, and timm models (``"timm:<name>"``). Always built without
pretrained weights; weights are loaded explicitly with ``load_weights``.

Name checks (``check_model_name``, ``ModelError``) import no torch; everything that builds, loads or runs a
model is imported on first use.

This package imports neither ray nor wandb nor any other kd_cluster package.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from kd_cluster.models.digest import weights_sha256
from kd_cluster.models.errors import ModelError
from kd_cluster.models.names import available_models, check_model_name
from kd_cluster.models.normalization import default_normalization

_LAZY = {"CIFAR_MODELS": "cifar", "SMALL_MODELS": "small", "SmallCNN": "small", "TappedModel": "taps",
         "feature_node_names": "taps", "build_model": "registry", "count_parameters": "registry",
         "load_weights": "weights", "save_weights": "weights", "Normalizer": "runtime",
         "keep_freed_memory": "runtime", "CompiledModule": "runtime", "maybe_compile": "runtime"}


def check_taps(arch: str, taps: Sequence[str]) -> None:
    """Raise ModelError unless every tap names a layer of ``arch`` (builds the model: imports torch)."""
    from kd_cluster.models.taps import check_taps as check

    check(arch, taps)


def __getattr__(name: str) -> Any:
    """The torch side of the package, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"kd_cluster.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CIFAR_MODELS",
    "CompiledModule",
    "ModelError",
    "Normalizer",
    "SMALL_MODELS",
    "SmallCNN",
    "TappedModel",
    "available_models",
    "build_model",
    "check_model_name",
    "check_taps",
    "count_parameters",
    "default_normalization",
    "feature_node_names",
    "keep_freed_memory",
    "load_weights",
    "maybe_compile",
    "save_weights",
    "weights_sha256",
]
