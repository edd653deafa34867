"""kd_cluster.data: sharded datasets (WebDataset tar + manifest on any fsspec URL) and deterministic streams.

Writing: :func:`write_split`, :func:`build_imagefolder`, :func:`build_mnist5k`, :func:`build_torchvision`,
:func:`build_idx`.
Finding: :func:`load_manifest` (URL, folder, or ``builtin://mnist5k/train``, ``builtin://fashion-mnist/val``).
Reading: :class:`TrainStream` + :func:`make_train_loader`, :class:`EvalStream`; batch mixup with
:func:`mixup_lambda` and :func:`mixup`. The determinism contract is in :mod:`kd_cluster.data.stream`.

Finding and reading manifests imports no torch (``kd-cluster validate`` opens them); the rest (streams,
augmentation, writers: torch and webdataset) is imported on first use.

This package imports nothing from the rest of kd_cluster, and never ray or wandb.
"""

from __future__ import annotations

import importlib
from typing import Any

from .catalog import builtin_names, cache_dir, is_builtin, load_manifest
from .errors import DataError, DatasetMissing
from .manifest import Manifest, ShardInfo

_LAZY = {
    "AugmentParams": "augment", "ViewParams": "augment", "draw_views": "augment", "image_size": "augment",
    "mixup": "augment", "mixup_lambda": "augment", "render_views": "augment",
    "LabelConfig": "soft_labels", "LabelSet": "soft_labels", "StoredViews": "soft_labels", "read_labels": "soft_labels",
    "EvalStream": "stream", "TrainStream": "stream", "close_loader": "stream", "make_eval_loader": "stream",
    "make_train_loader": "stream", "start_workers": "stream",
    "Reencode": "writer", "build_idx": "writer", "build_imagefolder": "writer", "build_mnist5k": "writer", "build_torchvision": "writer",
    "shrink_image": "writer", "write_split": "writer",
}


def __getattr__(name: str) -> Any:
    """The torch side of the package (streams, augmentation, writers), imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AugmentParams",
    "DataError",
    "DatasetMissing",
    "EvalStream",
    "LabelConfig",
    "LabelSet",
    "Manifest",
    "Reencode",
    "ShardInfo",
    "StoredViews",
    "TrainStream",
    "ViewParams",
    "build_idx",
    "build_imagefolder",
    "build_mnist5k",
    "build_torchvision",
    "builtin_names",
    "cache_dir",
    "close_loader",
    "draw_views",
    "image_size",
    "is_builtin",
    "load_manifest",
    "make_eval_loader",
    "make_train_loader",
    "mixup",
    "mixup_lambda",
    "read_labels",
    "render_views",
    "shrink_image",
    "start_workers",
    "write_split",
]
