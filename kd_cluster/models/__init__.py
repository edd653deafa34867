"""Models layer: build teachers/students by name, load/save weights over fsspec, feature taps; input
normalisation and the allocator settings every model-running process uses.

Sources of models: our small CNNs for 28-32 px inputs (``cnn_xs``, ``cnn_s``, ``cnn_m``, ``cnn_l``),
the CIFAR distillation-benchmark family (``"cifar:resnet8x4"``, ``"cifar:vgg13"``, ...), torchvision classification models, and timm models (``"timm:<name>"``). Always built without
pretrained weights; weights are loaded explicitly with ``load_weights``.

This package imports neither ray nor wandb nor any other kd_cluster package.
"""

from kd_cluster.models.cifar import CIFAR_MODELS
from kd_cluster.models.errors import ModelError
from kd_cluster.models.runtime import (CompiledModule, Normalizer, default_normalization, keep_freed_memory,
                                      maybe_compile)
from kd_cluster.models.registry import available_models, build_model, check_model_name, count_parameters
from kd_cluster.models.small import SMALL_MODELS, SmallCNN
from kd_cluster.models.taps import TappedModel, check_taps, feature_node_names
from kd_cluster.models.weights import load_weights, save_weights, weights_sha256

__all__ = [
    "CIFAR_MODELS",
    "CompiledModule",
    "SMALL_MODELS",
    "ModelError",
    "Normalizer",
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
