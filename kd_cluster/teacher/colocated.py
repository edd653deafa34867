"""Placement ``colocated``: the frozen teacher on each training worker's own device."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from kd_cluster.teacher.base import (MemberPlan, StepInput, Teacher, TeacherContext, TeacherEval, TeacherOutputs,
                                     TeacherPlan, teacher_input)


class ColocatedTeacher(Teacher):
    """A frozen teacher on the training worker's own device: eval mode, no grad, optional autocast.

    With ``taps`` the model is wrapped in :class:`~kd_cluster.models.TappedModel` and ``__call__``
    returns the named features the method asked for along with the logits. ``compile``: through
    :class:`~kd_cluster.models.CompiledModule`.
    """

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, taps: Sequence[str] = (), compile: bool = False) -> None:
        from kd_cluster.models import TappedModel, maybe_compile

        if taps:
            model = TappedModel(model, taps)
        model.eval().requires_grad_(False)
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.model = maybe_compile(model, compile, "teacher")
        self.device = device
        self.amp_dtype = amp_dtype
        self.taps = tuple(taps)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> TeacherOutputs:
        """(logits, {tap: feature}) for an already normalised (and possibly mixed) batch, in float32."""
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        with ctx:
            out = self.model(x)
        logits, feats = out if isinstance(out, tuple) else (out, {})
        return logits.float(), {k: v.float() for k, v in feats.items()}

    def step(self, inp: StepInput) -> TeacherOutputs:
        return self(teacher_input(inp))

    def probe(self, x: torch.Tensor) -> TeacherOutputs:
        return self(x)

    def evaluate(self, x: torch.Tensor, raw: torch.Tensor) -> TeacherEval:
        return TeacherEval(self(x)[0])


def load_member(member: MemberPlan, plan: TeacherPlan, device: torch.device, amp: torch.dtype | None,
                channels_last: bool, compile: bool = False) -> ColocatedTeacher:
    """Build one member's network, load its weights and freeze it on ``device``."""
    from kd_cluster.models import build_model, load_weights
    from kd_cluster.storage import storage_options

    model = build_model(member.arch, num_classes=plan.num_classes, in_chans=plan.channels)
    if member.weights:
        load_weights(model, member.weights, storage_options=storage_options(member.weights, plan.endpoint_url))
    return ColocatedTeacher(model, device, amp, channels_last, taps=member.taps, compile=compile)


def build_colocated(plan: TeacherPlan, ctx: TeacherContext, member: MemberPlan) -> Teacher:
    """The builder of ``placement: colocated`` (one member; ensembles combine several)."""
    return load_member(member, plan, ctx.device, ctx.amp, ctx.channels_last, plan.compile)


__all__ = ["ColocatedTeacher", "build_colocated", "load_member"]
