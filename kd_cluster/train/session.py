"""Where a training loop runs: the session gives it its rank, device, checkpoint restore and persist.

The loop only talks to a :class:`Session`; ``LocalSession`` (one process, no Ray) is here, the Ray
Train session lives in ``kd_cluster.cluster``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from kd_cluster.storage import CheckpointStore, Store, local_copy_dir, remove_local


class Session(Protocol):
    """What the loop needs from its runtime."""

    rank: int
    world_size: int
    device: torch.device
    interactive: bool

    def restore(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest complete checkpoint as a local folder, or None for a fresh start."""
        ...

    def save_checkpoint(self, local_dir: Path, step: int, metrics: dict[str, float]) -> None:
        """Persist this rank's checkpoint files (collective: every rank calls it at the same step)."""
        ...


class LocalSession:
    """A single process without Ray: checkpoints go through :class:`CheckpointStore` to the stage folder."""

    def __init__(self, stage_url: str, endpoint_url: str | None, keep: int, device: torch.device | None = None) -> None:
        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.interactive = sys.stderr.isatty()
        self.ckpts = CheckpointStore(Store(stage_url, endpoint_url))
        self.keep = keep

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        step = self.ckpts.latest()
        if step is None:
            yield None
            return
        d = local_copy_dir()
        try:
            self.ckpts.fetch(step, d)
            yield d
        finally:
            remove_local(d)

    def save_checkpoint(self, local_dir: Path, step: int, metrics: dict[str, float]) -> None:
        self.ckpts.save(local_dir, step, self.keep)


__all__ = ["LocalSession", "Session"]
