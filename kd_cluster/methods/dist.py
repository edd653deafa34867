"""DIST, Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022, arXiv 2205.10536).

Instead of the KL between softened predictions, DIST matches their *relations*, with the Pearson correlation
(which ignores the scale and offset of a prediction, so a much stronger teacher's sharper outputs need not be
matched exactly):

- inter-class: per sample, the correlation of student and teacher over the classes, ``1 - mean`` of it;
- intra-class: per class, the correlation over the batch, ``1 - mean`` of it;
- loss = ce_weight * CE + T^2 * (beta * inter + gamma * intra), predictions softmax(logits / T).

Defaults are the paper's ImageNet ones (beta = gamma = T = 1); its CIFAR-100 runs use beta = gamma = 2, T = 4.
"""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import (F, Method, MethodConfig, Needs, StepOutputs, mixed_cross_entropy, register,
                                     torch)


class DISTConfig(MethodConfig):
    """Settings of ``dist``."""

    ce_weight: float = Field(1.0, ge=0.0, description="Weight of the label cross-entropy.")
    beta: float = Field(1.0, ge=0.0, description="Weight of the inter-class relation term.")
    gamma: float = Field(1.0, ge=0.0, description="Weight of the intra-class relation term.")
    temperature: float = Field(1.0, gt=0.0, description="Softmax temperature T of both predictions.")
    eps: float = Field(1e-8, gt=0.0, description="Added to the product of norms in the correlation.")

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="same", labels=True,
                     full_logits="DIST correlates the student's prediction with the teacher's over every class")


def correlation_loss(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - mean`` over rows of the Pearson correlation of the rows of ``a`` and ``b`` (each row centred, then the
    cosine of the two)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return 1.0 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


@register("dist")
class DIST(Method):
    """DIST: teacher and student see the same input."""

    Config = DISTConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.teacher_logits is not None
        cfg = self.cfg
        t = cfg.temperature
        y_s = F.softmax(out.student_logits.float() / t, dim=1)
        y_t = F.softmax(out.teacher_logits.float() / t, dim=1)
        return {"ce": cfg.ce_weight * mixed_cross_entropy(out.student_logits, out.labels, out.lam),
                "inter": t * t * cfg.beta * correlation_loss(y_s, y_t, cfg.eps),
                "intra": t * t * cfg.gamma * correlation_loss(y_s.t(), y_t.t(), cfg.eps)}
