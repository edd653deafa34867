"""Function matching (Beyer et al., CVPR 2022, arXiv 2106.05237) and its two baselines.

``funmatch``: teacher and student see the very same augmented and mixed-up image; the loss is the KL
between their predictions only, no labels. The paper's two baselines:

``fixed_teacher``: the teacher sees the un-augmented center crop of each image; when the student's
  batch is mixed, the teacher's target is mixed at the probability level with the same lambda and
  partner (so the target does not depend on the crop).
``independent_views``: the teacher sees a second, independently drawn random crop of the same image,
  mixed with the same lambda and partner as the student's.
"""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import (F, LogitStandardization, Method, Needs, StepOutputs, register, soft_kl, standardize,
                                     torch)


class FunMatchConfig(LogitStandardization):
    """Settings of the function-matching family: loss = T^2 * KL(p_t^T || p_s^T)."""

    temperature: float = Field(1.0, gt=0, description="Softmax temperature T (the paper uses 1).")

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="same", labels=False,
                     live_teacher="function matching trains on the teacher's prediction for the very image the "
                     "student sees, cropped and mixed anew at every step; stored labels hold predictions for crops "
                     "fixed in advance")


class FixedTeacherConfig(FunMatchConfig):
    """Settings of ``fixed_teacher`` (the function-matching baseline whose teacher sees the center crop)."""

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="center", labels=False)


class IndependentViewsConfig(FunMatchConfig):
    """Settings of ``independent_views`` (the baseline whose teacher sees an independent crop)."""

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="independent", labels=False,
                     live_teacher="independent_views needs the teacher's prediction on a second crop drawn anew at "
                     "every step, mixed like the student's")


@register("funmatch")
class FunMatch(Method):
    """Consistent views + mixup, KL only."""

    Config = FunMatchConfig

    def logits(self, out: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits, standardized when the settings say so."""
        assert out.teacher_logits is not None
        s, t = out.student_logits, out.teacher_logits
        return (standardize(s), standardize(t)) if self.cfg.logit_standardization else (s, t)

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        return {"kl": soft_kl(*self.logits(out), self.cfg.temperature)}


@register("fixed_teacher")
class FixedTeacher(FunMatch):
    """Baseline: the teacher's target comes from the un-augmented center crop."""

    Config = FixedTeacherConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        s, t = self.logits(out)
        p_t = F.softmax(t.float() / self.cfg.temperature, dim=-1)
        if out.lam < 1.0:
            p_t = out.lam * p_t + (1.0 - out.lam) * p_t.roll(1, dims=0)
        return {"kl": soft_kl(s, t, self.cfg.temperature, teacher_probs=p_t)}


@register("independent_views")
class IndependentViews(FunMatch):
    """Baseline: teacher and student get independently drawn crops of the same image."""

    Config = IndependentViewsConfig
