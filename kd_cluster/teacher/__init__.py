"""Runs a frozen teacher on a batch and returns what the method asked for. Pure torch."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn


class ColocatedTeacher:
    """A frozen teacher on the training worker's own device: eval mode, no grad, optional autocast.

    With ``taps`` the model is wrapped in :class:`~kd_cluster.models.TappedModel` and ``__call__``
    returns the named features the method asked for along with the logits.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, taps: Sequence[str] = ()) -> None:
        if taps:
            from kd_cluster.models import TappedModel

            model = TappedModel(model, taps)
        model.eval().requires_grad_(False)
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.device = device
        self.amp_dtype = amp_dtype
        self.taps = tuple(taps)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {tap: feature}) for an already normalised (and possibly mixed) batch, in float32."""
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        with ctx:
            out = self.model(x)
        logits, feats = out if isinstance(out, tuple) else (out, {})
        return logits.float(), {k: v.float() for k, v in feats.items()}

    def logits(self, x: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits only (``raw``, the uint8 batch, is what a remote teacher sends instead of ``x``)."""
        return self(x)[0]


__all__ = ["ColocatedTeacher"]
