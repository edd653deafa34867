"""The Ray Train side of a training worker: a :class:`~kd_cluster.train.Session` over ``ray.train``."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import ray.train
import ray.train.torch


class RaySession:
    """Rank, device and checkpoints from Ray Train (checkpoints persist to the RunConfig storage)."""

    def __init__(self) -> None:
        # Train logs every report (all metrics) at INFO from each worker, under a logger named after its
        # file; our progress lines say it once. Guarded: it is Train's internal module.
        ctx_mod = sys.modules.get("ray.train.v2._internal.execution.context")
        if ctx_mod is not None and getattr(ctx_mod, "__file__", None):
            logging.getLogger(ctx_mod.__file__).setLevel(logging.WARNING)
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.interactive = False  # output is forwarded line by line to the driver

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def save_checkpoint(self, local_dir: Path, step: int, metrics: dict[str, float]) -> None:
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)))
