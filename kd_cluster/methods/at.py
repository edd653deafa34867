"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match normalised spatial attention maps.

For a feature map ``A`` of shape ``[N, C, H, W]`` the attention map is ``Q = mean_c |A_c|^p`` (p = 2),
flattened to ``H*W`` and L2-normalised per sample. For each chosen pair of student/teacher feature
groups ``j``: ``d_j = mean((Q_s/||Q_s|| - Q_t/||Q_t||)^2)`` (mean over samples and positions).

Loss = ``beta / 2 * sum_j d_j + ce_weight * CE + kd_weight * T^2 KL``.

We follow the authors' code: the squared difference averaged over positions, weighted by ``beta / 2``
with ``beta = 1000`` in their CIFAR setup (the paper writes the p-norm of the difference, not its
square, and ``beta / 2``; the CRD benchmark code uses ``beta`` without the halving, i.e. our
``beta = 2000``). When the two maps of a pair differ in spatial size, the student's attention map is
resized to the teacher's (average-pooled when larger, bilinear when smaller) before normalising.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from kd_cluster.methods._terms import CEKDConfig, ce_kd_terms, resize_to
from kd_cluster.methods.base import F, Method, Needs, StepOutputs, register, torch


class ATConfig(CEKDConfig):
    """Settings of ``at``."""

    student_layers: list[str] = Field(min_length=1, description="Student feature taps (maps), e.g. "
                                      "[layer1, layer2, layer3].")
    teacher_layers: list[str] = Field(min_length=1, description="Teacher feature taps, paired in order with "
                                      "student_layers.")
    beta: float = Field(1000.0, ge=0.0, description="Attention loss weight; the loss uses beta / 2.")
    p: float = Field(2.0, gt=0.0, description="Power of the activations in the attention map.")

    @model_validator(mode="after")
    def _paired(self) -> "ATConfig":
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"student_layers ({len(self.student_layers)}) and teacher_layers "
                             f"({len(self.teacher_layers)}) must pair up one to one")
        return self

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, student_features=tuple(self.student_layers),
                     teacher_features=tuple(self.teacher_layers))


def attention_map(f: torch.Tensor, p: float, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[N, H*W]``: L2-normalised channel mean of ``|f|^p`` (resized to ``size`` first when given)."""
    a = f.abs().pow(p).mean(dim=1, keepdim=True) if p != 2 else f.pow(2).mean(dim=1, keepdim=True)
    if size is not None:
        a = resize_to(a, size)
    return F.normalize(a.flatten(1), dim=1)


@register("at")
class AT(Method):
    """Attention transfer over one or more feature groups."""

    Config = ATConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        total = torch.zeros((), device=out.labels.device)
        for s_name, t_name in zip(self.cfg.student_layers, self.cfg.teacher_layers, strict=True):
            t = out.teacher_features[t_name]
            s = out.student_features[s_name]
            if s.ndim != 4 or t.ndim != 4:
                raise ValueError(f"at: taps {s_name!r} (student) and {t_name!r} (teacher) must be feature maps "
                                 f"[N, C, H, W], got {list(s.shape)} and {list(t.shape)}")
            size = tuple(t.shape[-2:])
            total = total + (attention_map(s, self.cfg.p, size) - attention_map(t, self.cfg.p)).pow(2).mean()
        return {"at": self.cfg.beta / 2 * total} | ce_kd_terms(self.cfg, out)
