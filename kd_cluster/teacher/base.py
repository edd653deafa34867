"""The teacher seam: what the training loop asks of a frozen teacher, wherever the teacher runs.

The loop holds one :class:`Teacher` and calls, in this order:

1. ``probe(x)`` once, with a dummy batch, so the method can size its modules from the output shapes;
2. ``feed(batches, lam_of_step)`` once, around the training batch iterator: a placement that computes
   elsewhere sends each batch's request ahead here (pipelining), a colocated teacher passes batches through;
3. ``step(inp)`` at every training step, with the step's batch, the student's input and how the method wants
   the teacher to see the batch (:class:`TeacherView`); it returns the teacher's logits and feature taps;
4. ``evaluate(x, raw)`` on validation batches (normalised ``x`` and the uint8 ``raw`` batch; a placement
   that runs elsewhere sends ``raw``, never float pixels);
5. ``metrics()`` at log steps (placement-specific figures; resets its window), ``close()`` when the stage ends.

A placement is a :class:`Teacher` subclass plus a builder ``(TeacherPlan, TeacherContext) -> Teacher``
registered in :data:`kd_cluster.teacher.PLACEMENTS`. Everything a builder may need is in the two arguments;
the loop never asks where the teacher runs. Ray-backed placements keep their Ray half (starting actors) in
``kd_cluster.cluster`` and receive the handles through ``TeacherContext.pools``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kd_cluster.teacher.plan import MemberPlan, TeacherPlan, View

Batch = dict[str, Any]
TeacherOutputs = tuple[torch.Tensor, dict[str, torch.Tensor]]
"""(logits, {tap name: feature}) in float32 on the training device."""

VIEWS: dict[str, tuple[str, ...]] = {"same": ("aug",), "center": ("aug", "center"), "independent": ("aug", "aug2")}
"""The stream views a training batch carries for a teacher of each view kind (see ``kd_cluster.data``)."""


@dataclass(frozen=True)
class TeacherView:
    """How the method of the stage wants the teacher to see a training batch.

    ``kind``: "same" (the very tensor the student sees, mixed and expanded), "center" (the batch's second
    view, the un-augmented center crop, not mixed) or "independent" (the batch's second view, an independent
    crop, mixed with the step's lambda). ``expand`` is the method's batch expansion, ``norm`` the device-side
    normalisation of uint8 batches.
    """

    kind: View
    expand: Callable[[torch.Tensor], torch.Tensor]
    norm: nn.Module


@dataclass
class StepInput:
    """One training step, as the teacher gets it."""

    batch: Batch
    """The loader's batch (uint8 ``image``, optional second view ``image_t``, ``step``)."""
    x: torch.Tensor
    """The student's input: normalised, mixed with ``lam``, expanded by the method."""
    lam: float
    view: TeacherView
    device: torch.device


@dataclass
class TeacherEval:
    """A teacher's logits on a validation batch; an ensemble adds each member's."""

    logits: torch.Tensor
    members: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TeacherContext:
    """What the training worker gives a placement's builder."""

    device: torch.device
    rank: int
    amp: torch.dtype | None
    """Autocast dtype on this device (None: full precision)."""
    channels_last: bool
    expand: Callable[[torch.Tensor], torch.Tensor]
    """The stage method's expansion."""
    pools: dict[str, Any] | None = None
    """Per member name, the pool of servers a driver started for this stage (Ray actors); None: none started."""


class Teacher:
    """Base of every placement. Subclasses implement :meth:`step`, :meth:`probe` and :meth:`evaluate`."""

    member_names: tuple[str, ...] = ()
    """Ensembles: the members' names (their eval figures are logged per member)."""
    reads_views: bool = True
    """Whether :meth:`step` reads the batch's views on the training device (False: they were sent away)."""
    evaluates: bool = True
    """Whether :meth:`evaluate` can label validation images (False: evaluations report no teacher figures)."""
    view_source: Any = None
    """Where the training stream takes each sample's crop from (``kd_cluster.data.StoredViews``); None: the
    stream draws it."""

    def train_views(self, kind: View) -> tuple[str, ...]:
        """The views the training stream must produce for a method whose teacher sees ``kind``."""
        return VIEWS[kind]

    def feed(self, batches: Iterator[Batch], lam_of_step: Callable[[int], float]) -> Iterator[Batch]:
        """The training batches, in order, as this teacher needs them. Default: unchanged."""
        return batches

    def step(self, inp: StepInput) -> TeacherOutputs:  # pragma: no cover - abstract
        """The teacher's logits and taps for one training step."""
        raise NotImplementedError

    def probe(self, x: torch.Tensor) -> TeacherOutputs:  # pragma: no cover - abstract
        """Outputs for a dummy batch shaped like ``x`` (shapes only; no expansion is applied)."""
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor, raw: torch.Tensor) -> TeacherEval:  # pragma: no cover - abstract
        """Logits of a validation batch: ``x`` normalised on the device, ``raw`` the uint8 batch."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Figures of this log window (called at log steps on every rank); resets the window. Default: none."""
        return {}

    def close(self) -> None:
        """Release what the teacher holds (threads, in-process servers). Default: nothing."""


TeacherBuilder = Callable[[TeacherPlan, TeacherContext, MemberPlan], "Teacher"]
"""What a placement registers: builds one member's :class:`Teacher` on a training worker."""


def teacher_input(inp: StepInput) -> torch.Tensor:
    """The tensor a teacher on the training device sees, for the method's view of the step."""
    if inp.view.kind == "same":
        return inp.x
    from kd_cluster.data import mixup

    xt = inp.view.norm(inp.batch["image_t"].to(inp.device, non_blocking=True))
    if inp.view.kind == "independent" and inp.lam < 1.0:
        xt = mixup(xt, inp.lam)
    return inp.view.expand(xt)


__all__ = ["VIEWS", "Batch", "MemberPlan", "StepInput", "Teacher", "TeacherBuilder", "TeacherContext", "TeacherEval",
           "TeacherOutputs", "TeacherPlan", "TeacherView", "View", "teacher_input"]
