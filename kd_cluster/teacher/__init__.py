"""Frozen teachers behind one seam: the loop holds a :class:`Teacher` and never asks where it runs.

Placements (:data:`PLACEMENTS`, ``teacher.placement`` in a job): ``colocated`` (on each training worker's
device), ``actors`` (a pool of teacher-inference servers; Ray actors started by the driver, or one
in-process server without Ray) and ``stored`` (predictions computed ahead by ``kd-cluster teacher label`` and
replayed with their crops). A teacher with several ``members`` is an :class:`EnsembleTeacher` whose
members the stage's placement builds. Adding a placement: one module here with a builder
``(TeacherPlan, TeacherContext, MemberPlan) -> Teacher`` and one line in :data:`PLACEMENTS` (a Ray-backed one
also registers how the driver starts its pools, in ``kd_cluster.cluster.teacher_pool``). Pure torch, imported on
first use: the plans (:mod:`kd_cluster.teacher.plan`) import no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kd_cluster.teacher.plan import MemberPlan, TeacherPlan

if TYPE_CHECKING:
    from kd_cluster.teacher.base import Teacher, TeacherContext

PLACEMENTS: dict[str, str] = {
    "colocated": "colocated:build_colocated",
    "actors": "remote:build_actors",
    "stored": "stored:build_stored",
}
"""``teacher.placement`` -> ``"file:function"`` (in this package) of the builder of one member's :class:`Teacher`
on a training worker; imported when a teacher is built, so that planning a job imports no torch."""


def placement_builder(placement: str) -> Any:
    """The builder registered for ``placement`` (imports its module)."""
    module, fn = PLACEMENTS[placement].split(":")
    return getattr(importlib.import_module(f"kd_cluster.teacher.{module}"), fn)


def build_teacher(plan: TeacherPlan, ctx: TeacherContext) -> Teacher:
    """The stage's teacher on this worker: its one member, or the ensemble of its members."""
    from kd_cluster.teacher.ensemble import EnsembleTeacher

    build = placement_builder(plan.placement)
    if not plan.is_ensemble:
        return build(plan, ctx, plan.members[0])
    members = {m.name: build(plan, ctx, m) for m in plan.members}
    features_from = next((m.name for m in plan.members if m.taps), None)
    return EnsembleTeacher(members, {m.name: m.weight for m in plan.members}, features_from, ctx.device)


_LAZY = {"StepInput": "base", "Teacher": "base", "TeacherBuilder": "base", "TeacherContext": "base",
         "TeacherEval": "base", "TeacherOutputs": "base", "TeacherView": "base", "teacher_input": "base",
         "ColocatedTeacher": "colocated", "EnsembleTeacher": "ensemble"}


def __getattr__(name: str) -> Any:
    """The torch side of the seam, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"kd_cluster.teacher.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PLACEMENTS", "ColocatedTeacher", "EnsembleTeacher", "MemberPlan", "StepInput", "Teacher", "TeacherBuilder",
           "TeacherContext", "TeacherEval", "TeacherOutputs", "TeacherPlan", "TeacherView", "build_teacher",
           "placement_builder", "teacher_input"]
