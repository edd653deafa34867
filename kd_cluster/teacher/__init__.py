"""Frozen teachers behind one seam: the loop holds a :class:`Teacher` and never asks where it runs.

Placements (:data:`PLACEMENTS`, ``teacher.placement`` in a job): ``colocated`` (on each training worker's
device), ``actors`` (a pool of teacher-inference servers; Ray actors started by the driver, or one
in-process server without Ray) and ``stored`` (predictions computed ahead by ``kd-cluster teacher label`` and
replayed with their crops). A teacher with several ``members`` is an :class:`EnsembleTeacher` whose
members the stage's placement builds. Adding a placement: one module here with a builder
``(TeacherPlan, TeacherContext, MemberPlan) -> Teacher`` and one line in :data:`PLACEMENTS` (a Ray-backed one
also registers how the driver starts its pools, in ``kd_cluster.cluster.teacher_pool``). Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable

from kd_cluster.teacher.base import (MemberPlan, StepInput, Teacher, TeacherContext, TeacherEval, TeacherOutputs,
                                     TeacherPlan, TeacherView, teacher_input)
from kd_cluster.teacher.colocated import ColocatedTeacher, build_colocated
from kd_cluster.teacher.ensemble import EnsembleTeacher
from kd_cluster.teacher.remote import build_actors
from kd_cluster.teacher.stored import build_stored

TeacherBuilder = Callable[[TeacherPlan, TeacherContext, MemberPlan], Teacher]

PLACEMENTS: dict[str, TeacherBuilder] = {
    "colocated": build_colocated,
    "actors": build_actors,
    "stored": build_stored,
}
"""``teacher.placement`` -> the builder of one member's :class:`Teacher` on a training worker."""


def build_teacher(plan: TeacherPlan, ctx: TeacherContext) -> Teacher:
    """The stage's teacher on this worker: its one member, or the ensemble of its members."""
    build = PLACEMENTS[plan.placement]
    if not plan.is_ensemble:
        return build(plan, ctx, plan.members[0])
    members = {m.name: build(plan, ctx, m) for m in plan.members}
    features_from = next((m.name for m in plan.members if m.taps), None)
    return EnsembleTeacher(members, {m.name: m.weight for m in plan.members}, features_from, ctx.device)


__all__ = ["PLACEMENTS", "ColocatedTeacher", "EnsembleTeacher", "MemberPlan", "StepInput", "Teacher", "TeacherBuilder",
           "TeacherContext", "TeacherEval", "TeacherOutputs", "TeacherPlan", "TeacherView", "build_teacher",
           "teacher_input"]
