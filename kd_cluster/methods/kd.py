"""KD (Hinton et al. 2015): softened logits, KL at temperature T, plus label cross-entropy."""

from __future__ import annotations

import torch

from kd_cluster.methods.base import Method, StepOutputs, mixed_cross_entropy, soft_kl
from kd_cluster.methods.settings import KDConfig


class KD(Method):
    """Classic KD; teacher and student see the same input."""

    Config = KDConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.teacher_logits is not None
        a = self.cfg.alpha
        return {
            "kl": a * soft_kl(out.student_logits, out.teacher_logits, self.cfg.temperature),
            "ce": (1.0 - a) * mixed_cross_entropy(out.student_logits, out.labels, out.lam),
        }
