"""Where a training loop runs: the session gives it its rank, device, and preemption flag.

Checkpoints do not go through the session: the loop writes them itself to ``<stage>/checkpoints``
(:mod:`kd_cluster.train.checkpoint`), the same way with and without Ray. ``LocalSession`` (one
process, no Ray) is here; the Ray Train session lives in ``kd_cluster.cluster``.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch

from kd_cluster.train.preempt import PreemptionFlag


class Session(Protocol):
    """What the loop needs from its runtime."""

    rank: int
    world_size: int
    device: torch.device
    interactive: bool
    preemption: PreemptionFlag

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Tell the runtime about progress (at checkpoint steps)."""
        ...


class LocalSession:
    """A single process without Ray; SIGTERM raises the preemption flag.

    ``window_decoder``: a stand-in for the GPU decoder of ``data.decode: gpu``
    (:data:`~kd_cluster.data.gpu_decode.Decode`, e.g. ``pil_window_decode``), so that path runs on a machine
    without CUDA (tests, ``tests/gpu/run.sh --cpu-smoke``); None: nvImageCodec on the CUDA device.
    """

    def __init__(self, device: torch.device | None = None, window_decoder: Any = None) -> None:
        self.rank, self.world_size = 0, 1
        self.window_decoder = window_decoder
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.interactive = sys.stderr.isatty()
        self.preemption = PreemptionFlag()
        self.preemption.install_sigterm()

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Nothing to tell: the loop's own sinks log progress."""


__all__ = ["LocalSession", "Session"]
