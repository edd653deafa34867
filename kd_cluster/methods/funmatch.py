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

import torch
import torch.nn.functional as F

from kd_cluster.methods.base import Method, StepOutputs, soft_kl
from kd_cluster.methods.settings import FixedTeacherConfig, FunMatchConfig, IndependentViewsConfig


class FunMatch(Method):
    """Consistent views + mixup, KL only."""

    Config = FunMatchConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.teacher_logits is not None
        return {"kl": soft_kl(out.student_logits, out.teacher_logits, self.cfg.temperature)}


class FixedTeacher(Method):
    """Baseline: the teacher's target comes from the un-augmented center crop."""

    Config = FixedTeacherConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.teacher_logits is not None
        p_t = F.softmax(out.teacher_logits.float() / self.cfg.temperature, dim=-1)
        if out.lam < 1.0:
            p_t = out.lam * p_t + (1.0 - out.lam) * p_t.roll(1, dims=0)
        return {"kl": soft_kl(out.student_logits, out.teacher_logits, self.cfg.temperature, teacher_probs=p_t)}


class IndependentViews(FunMatch):
    """Baseline: teacher and student get independently drawn crops of the same image."""

    Config = IndependentViewsConfig
