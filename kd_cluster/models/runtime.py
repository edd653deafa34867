"""What every process that runs a model needs, whatever it is (training worker, teacher actor, benchmark):
input normalisation on the device, the allocator settings of the process, and compilation.

:class:`CompiledModule` runs a module through ``torch.compile`` (``resources.compile``) and, when compilation
fails (no C++ compiler for the CPU backend, an operator the compiler cannot take, ...), warns once and runs the
module as it is from then on: a speed setting never stops a run.

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
import warnings
from typing import Any

import torch
from torch import nn

from kd_cluster.models.normalization import default_normalization

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


class CompiledModule(nn.Module):
    """``module`` through ``torch.compile``; the first failure warns once and falls back to ``module`` itself.

    Parameters, buffers and the train/eval mode are ``module``'s own (the compiled callable is not a registered
    child, so ``state_dict`` keys are those of ``module`` prefixed by ``module.``; checkpoints save ``module``).
    A failure is caught where compilation happens, at a forward call; a backward graph that fails to compile
    later, in the backward pass, is not caught here. ``backend`` defaults to ``KD_CLUSTER_COMPILE_BACKEND`` from the
    environment, else ``inductor`` (``eager`` traces without generating code: quick checks of the compile path).
    """

    def __init__(self, module: nn.Module, what: str, backend: Any = None) -> None:
        super().__init__()
        self.module = module
        self.what = what
        backend = backend or os.environ.get("KD_CLUSTER_COMPILE_BACKEND", "inductor")
        self.__dict__["_compiled"] = torch.compile(module, backend=backend)
        self.failed = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.__dict__["_compiled"](*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the module runs uncompiled instead
                self.failed = True
                cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # the compiler's own error
                reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
                warnings.warn(f"torch.compile of the {self.what} failed ({reason}); "
                              f"the {self.what} runs uncompiled", RuntimeWarning, stacklevel=2)
        return self.module(*args, **kwargs)


def maybe_compile(module: nn.Module, enabled: bool, what: str) -> nn.Module:
    """``CompiledModule(module)`` when ``enabled``, else ``module``."""
    return CompiledModule(module, what) if enabled else module


__all__ = ["CompiledModule", "Normalizer", "default_normalization", "keep_freed_memory", "maybe_compile"]
