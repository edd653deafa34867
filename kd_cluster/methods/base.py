"""What every method is: a torch module that turns one step's outputs into named loss terms.

A method declares what it needs (a teacher? which view of the image does the teacher see? labels?)
and the training loop asks it; nothing outside this package branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn


class MethodConfig(BaseModel):
    """Base of every method's own settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Needs:
    """What a method asks of the loop.

    teacher_view: "same" (teacher and student see the very same augmented, mixed-up tensor),
    "center" (teacher sees the un-augmented center crop, no mixup), or "independent" (teacher sees a
    second, independently drawn crop of the same image, mixed with the same lambda and partner).
    """

    teacher: bool
    teacher_view: Literal["same", "center", "independent"] = "same"
    labels: bool = False


@dataclass
class StepOutputs:
    """What the loop hands a method after the forward passes of one step."""

    student_logits: torch.Tensor
    labels: torch.Tensor
    lam: float
    teacher_logits: torch.Tensor | None = None


class Method(nn.Module):
    """A distillation method. Subclasses set ``Config`` and ``needs`` and implement ``forward``."""

    Config: ClassVar[type[MethodConfig]]
    needs: ClassVar[Needs]

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Named, already weighted loss terms; the loop minimises their sum and logs each."""
        raise NotImplementedError


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, lam: float,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against mixup targets: lam * CE(y) + (1 - lam) * CE(y rolled by one)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if lam >= 1.0:
        return ce
    ce_b = F.cross_entropy(logits, labels.roll(1, dims=0), label_smoothing=label_smoothing)
    return lam * ce + (1.0 - lam) * ce_b


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, averaged over the batch, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    ``teacher_probs`` replaces softmax(teacher_logits / T) when the target is built elsewhere.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_probs is None:
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(log_p_s, teacher_probs.float(), reduction="batchmean")
    return kl * (t * t)
