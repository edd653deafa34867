"""What every process that runs a model needs, whatever it is (training worker, teacher actor, benchmark):
input normalisation on the device, and the allocator settings of the process.

:class:`Normalizer` turns the uint8 batches the loaders ship into normalised floats on the device (the loader
never builds float pixels); :func:`default_normalization` gives the statistics a job did not set.

:func:`keep_freed_memory` keeps glibc from handing freed activation memory back to the kernel after every
forward pass. PyTorch's CPU allocator is plain ``malloc``. With glibc's defaults, multi-MB activation buffers are served by
``mmap`` or from the top of the heap that ``free`` trims again, so each forward pass faults its activations
in afresh (the kernel zeroes every 4 KiB page). In a teacher actor this showed as ~127,000 minor page faults
per second and a teacher forward 35-50% slower than the same forward in a plain process; training workers
are affected the same way. Raising the mmap
and trim thresholds (which also turns glibc's dynamic threshold off) keeps those pages in the process.
Costs: freed memory up to the thresholds stays resident. No effect (returns False) where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from torch import nn

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum; larger allocations still get their own mapping
TRIM_THRESHOLD_BYTES = 1024 * 2**20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they were set.

    ``KD_CLUSTER_MALLOC_DEFAULTS=1`` in the environment leaves glibc's defaults alone.
    """
    if os.environ.get("KD_CLUSTER_MALLOC_DEFAULTS") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok


class Normalizer(nn.Module):
    """uint8 NCHW on the device -> normalised float; the loader never builds float pixels."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255.0), persistent=False)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) * self.inv_std).contiguous(memory_format=self.fmt)


def default_normalization(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics for RGB, 0.5/0.5 for grayscale."""
    if channels == 3:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [0.5] * channels, [0.5] * channels


__all__ = ["Normalizer", "default_normalization", "keep_freed_memory"]
