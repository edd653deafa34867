"""Plain supervised training with cross-entropy: teachers trained as a job stage, from-scratch baselines."""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import Method, MethodConfig, Needs, StepOutputs, mixed_cross_entropy, register, torch


class SupervisedConfig(MethodConfig):
    """Settings of ``supervised``."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the CE.")

    def needs(self) -> Needs:
        return Needs(teacher=False, labels=True)


@register("supervised")
class Supervised(Method):
    """Cross-entropy on the labels (mixup-aware); no teacher."""

    Config = SupervisedConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        return {"ce": mixed_cross_entropy(out.student_logits, out.labels, out.lam, self.cfg.label_smoothing)}
