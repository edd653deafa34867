"""KD (Hinton et al. 2015): softened logits, KL at temperature T, plus label cross-entropy; optionally on
standardized logits (Sun et al., CVPR 2024)."""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import (LogitStandardization, Method, Needs, StepOutputs, mixed_cross_entropy, register,
                                     soft_kl, standardize, torch)


class KDConfig(LogitStandardization):
    """Settings of ``kd``: loss = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE."""

    temperature: float = Field(4.0, gt=0, description="Softmax temperature T.")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="Weight of the KL term; CE gets 1 - alpha.")

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="same", labels=True)


@register("kd")
class KD(Method):
    """Classic KD; teacher and student see the same input."""

    Config = KDConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.teacher_logits is not None
        a = self.cfg.alpha
        s, t = out.student_logits, out.teacher_logits
        if self.cfg.logit_standardization:
            s, t = standardize(s), standardize(t)
        return {
            "kl": a * soft_kl(s, t, self.cfg.temperature),
            "ce": (1.0 - a) * mixed_cross_entropy(out.student_logits, out.labels, out.lam),
        }
