"""DKD, Decoupled Knowledge Distillation (Zhao et al., CVPR 2022, arXiv 2203.08679).

KD's KL splits into a target-class part and a non-target part (TCKD and NCKD), which DKD weights on their own:

- TCKD: the binary distributions (p of the labelled class, 1 - p) of teacher and student, KL at temperature T;
- NCKD: the distributions over the other classes alone (the labelled class's logit masked out), KL at T;
- loss = ce_weight * CE + ramp * (alpha * T^2 * TCKD + beta * T^2 * NCKD), ramp rising linearly from 0 to 1 over
  the first ``warmup_fraction`` of the stage's steps (the paper: 20 of 240 epochs).

With mixup, the labelled class is each sample's own label (the larger share of its mixed image). With
``logit_standardization`` both logits are z-scored first (Sun et al., CVPR 2024: DKD + LS).
"""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import (F, LogitStandardization, Method, Needs, SetupInfo, StepOutputs, mixed_cross_entropy,
                                     register, standardize, torch)

MASK = 1000.0
"""Subtracted from the labelled class's (tempered) logit: its share of the non-target softmax is then exp(-1000)."""


class DKDConfig(LogitStandardization):
    """Settings of ``dkd`` (defaults: the paper's CIFAR-100 ones; ImageNet: beta 0.5, temperature 1)."""

    ce_weight: float = Field(1.0, ge=0.0, description="Weight of the label cross-entropy.")
    alpha: float = Field(1.0, ge=0.0, description="Weight of TCKD, the target-class term.")
    beta: float = Field(8.0, ge=0.0, description="Weight of NCKD, the non-target-class term.")
    temperature: float = Field(4.0, gt=0.0, description="Softmax temperature T of both terms.")
    warmup_fraction: float = Field(20 / 240, ge=0.0, le=1.0, description="Fraction of the stage's steps over which "
                                   "the DKD terms ramp in linearly (0: full weight from the first step).")

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="same", labels=True,
                     full_logits="DKD needs every class's teacher logit (its non-target term renormalises over all "
                     "the other classes)")


def dkd_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each a batch-mean KL times T^2."""
    t2 = temperature * temperature
    s, t = student.float() / temperature, teacher.float() / temperature
    target = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)

    def binary(p: torch.Tensor) -> torch.Tensor:  # (p of the labelled class, the rest)
        on = (p * target).sum(1, keepdim=True)
        return torch.cat([on, (p * ~target).sum(1, keepdim=True)], dim=1)

    tckd = F.kl_div(binary(p_s).log(), binary(p_t), reduction="batchmean") * t2
    masked = MASK * target
    nckd = F.kl_div(F.log_softmax(s - masked, dim=1), F.softmax(t - masked, dim=1), reduction="batchmean") * t2
    return tckd, nckd


@register("dkd")
class DKD(Method):
    """Decoupled KD: teacher and student see the same input."""

    Config = DKDConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        self.ramp_steps = self.cfg.warmup_fraction * info.total_steps

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.teacher_logits is not None
        cfg = self.cfg
        s, t = out.student_logits, out.teacher_logits
        if cfg.logit_standardization:
            s, t = standardize(s), standardize(t)
        tckd, nckd = dkd_terms(s, t, out.labels, cfg.temperature)
        ramp = min(1.0, (out.step + 1) / self.ramp_steps) if self.ramp_steps > 0 else 1.0
        return {"ce": cfg.ce_weight * mixed_cross_entropy(out.student_logits, out.labels, out.lam),
                "tckd": ramp * cfg.alpha * tckd, "nckd": ramp * cfg.beta * nckd}
