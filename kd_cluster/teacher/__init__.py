"""Runs a frozen teacher on a batch and returns what the method asked for. Pure torch."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class ColocatedTeacher:
    """A frozen teacher on the training worker's own device: eval mode, no grad, optional autocast."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False) -> None:
        model.eval().requires_grad_(False)
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.device = device
        self.amp_dtype = amp_dtype

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for an already normalised (and possibly mixed) batch."""
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        with ctx:
            return self.model(x)


__all__ = ["ColocatedTeacher"]
