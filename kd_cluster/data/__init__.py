"""kd_cluster.data: sharded datasets (WebDataset tar + manifest on any fsspec URL) and deterministic streams.

Writing: :func:`write_split`, :func:`build_imagefolder`, :func:`build_mnist5k`, :func:`build_torchvision`.
Finding: :func:`load_manifest` (URL, folder, or ``builtin://mnist5k/train``).
Reading: :class:`TrainStream` + :func:`make_train_loader`, :class:`EvalStream`; batch mixup with
:func:`mixup_lambda` and :func:`mixup`. The determinism contract is in :mod:`kd_cluster.data.stream`.

This package imports nothing from the rest of kd_cluster, and never ray or wandb.
"""

from .augment import AugmentParams, ViewParams, draw_views, image_size, mixup, mixup_lambda, render_views
from .catalog import builtin_names, cache_dir, is_builtin, load_manifest
from .errors import DataError
from .manifest import Manifest, ShardInfo
from .soft_labels import LabelConfig, LabelSet, StoredViews, read_labels
from .stream import EvalStream, TrainStream, close_loader, make_eval_loader, make_train_loader, start_workers
from .writer import Reencode, build_imagefolder, build_mnist5k, build_torchvision, shrink_image, write_split

__all__ = [
    "AugmentParams",
    "DataError",
    "EvalStream",
    "LabelConfig",
    "LabelSet",
    "Manifest",
    "ShardInfo",
    "StoredViews",
    "TrainStream",
    "Reencode",
    "ViewParams",
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
