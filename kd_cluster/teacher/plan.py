"""What the planner resolves about a stage's teacher (its own part of the job; picklable, no torch): the
members with their weights and taps, the view the method asks for, the normalisation, the placement's settings.
Kept apart from the torch side of the seam (:mod:`kd_cluster.teacher.base`) so that planning a job, and
``kd-cluster validate``, import no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

View = Literal["same", "center", "independent"]


@dataclass(frozen=True)
class MemberPlan:
    """One frozen network of the teacher (a single teacher has one member)."""

    name: str
    arch: str
    weights: str | None
    """Absolute weights URI (``stage:`` references already resolved by the planner)."""
    weight: float = 1.0
    """Relative weight in an ensemble's probability average."""
    taps: tuple[str, ...] = ()
    """Feature taps the method gets from this member."""
    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    resource: str | None = None


@dataclass(frozen=True)
class TeacherPlan:
    """The teacher of one stage, resolved by the planner: the teacher's own part of the job (picklable)."""

    placement: str
    members: tuple[MemberPlan, ...]
    view: View
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    endpoint_url: str | None
    method_name: str
    """The stage's method, whose expansion a teacher running elsewhere applies itself."""
    method_params: dict[str, Any] = field(default_factory=dict)
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    """torch.compile the teacher's networks (``resources.compile``)."""
    prefetch: int = 1
    max_in_flight: int = 4
    request_timeout_s: float = 120.0
    max_retries: int = 5
    max_restarts: int = 3
    labels: str | None = None
    """Placement ``stored``: the label set (folder or ``labels.json``) to replay."""
    seed: int = 0
    """The job's seed (placement ``stored`` picks the replayed view of each sample and pass from it)."""
    label_expect: dict[str, Any] = field(default_factory=dict)
    """Placement ``stored``: what the stage expects of the label set (teacher, image size, augmentation, data);
    checked when the labels are opened (``kd_cluster.data.soft_labels.label_mismatches``)."""

    @property
    def is_ensemble(self) -> bool:
        """Whether the teacher averages several members."""
        return len(self.members) > 1


__all__ = ["MemberPlan", "TeacherPlan", "View"]
