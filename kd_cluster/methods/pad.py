"""Prime-Aware Adaptive Distillation, PAD (Zhang et al., ECCV 2020, arXiv 2008.01458).

Feature distillation on pooled features in which every sample and dimension is re-weighted by a
learned data uncertainty. A connector (a linear layer on the pooled student feature) maps the student
feature ``s`` to the teacher's width; a variance branch (another linear layer on the same pooled
student feature) predicts ``v = log sigma^2`` per dimension. With ``t`` the pooled teacher feature:

    pad = mean( (t - s)^2 / (eps + exp(r * v)) + r * v )          (mean over samples and dimensions)

Samples the student finds hard ("non-prime") get a large sigma^2 and a small weight; the ``log sigma^2``
term keeps sigma from growing without bound. ``r`` is the warm-up ramp of the uncertainty weighting:
it rises linearly from 0 to 1 over the first ``warmup_fraction`` of the stage's steps (from
``out.step`` and ``SetupInfo.total_steps``); at ``r = 0`` the loss is the plain feature L2 divided by
``1 + eps``. ``mode: l2`` is the warm-up stage of the usual two-stage recipe (feature L2 with the
connector, no variance branch in the loss); a ``pad`` stage then starts from that stage's student
(``student.weights: stage:<warm-up>``) and connector (``init: stage:<warm-up>``).

Loss = ``feature_weight * (pad or l2) + ce_weight * CE + kd_weight * T^2 KL``. Pooled features are
global averages of the tapped maps (a vector tap such as ``flatten`` is used as it is).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd_cluster.methods._terms import CEKDConfig, ce_kd_terms, pooled
from kd_cluster.methods.base import Method, Needs, SetupInfo, StepOutputs, nn, register, torch


class PADConfig(CEKDConfig):
    """Settings of ``pad``."""

    student_layer: str = Field(description="Student feature tap, pooled to a vector (e.g. flatten, layer3).")
    teacher_layer: str = Field(description="Teacher feature tap, pooled to a vector.")
    mode: Literal["pad", "l2"] = Field("pad", description="pad: uncertainty-weighted distance; l2: plain "
                                       "feature L2 through the connector (the warm-up stage).")
    feature_weight: float = Field(1.0, ge=0.0, description="Weight of the feature term.")
    eps: float = Field(1e-6, gt=0.0, description="Added to sigma^2 in the denominator.")
    warmup_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of the stage's steps over which "
                                   "the uncertainty weighting ramps in linearly (0: from the first step).")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


@register("pad")
class PAD(Method):
    """Uncertainty-weighted feature distillation with a learned per-dimension variance."""

    Config = PADConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        s_dim = pooled(probe.student_features[self.cfg.student_layer]).shape[1]
        t_dim = pooled(probe.teacher_features[self.cfg.teacher_layer]).shape[1]
        self.connector = nn.Linear(s_dim, t_dim)
        self.log_var = nn.Linear(s_dim, t_dim)
        nn.init.zeros_(self.log_var.weight)  # start at sigma^2 = 1: the loss begins as plain L2
        nn.init.zeros_(self.log_var.bias)
        self.total_steps = max(1, info.total_steps)
        self._ramp = 0.0

    def ramp(self, step: int) -> float:
        """Weight ``r`` of the uncertainty at ``step``: linear from 0 to 1 over the warm-up, then 1."""
        warm = self.cfg.warmup_fraction * self.total_steps
        return 1.0 if warm <= 0 else min(1.0, step / warm)

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        f = pooled(out.student_features[self.cfg.student_layer])
        t = pooled(out.teacher_features[self.cfg.teacher_layer])
        sq = (t - self.connector(f)).pow(2)
        if self.cfg.mode == "l2":
            feat = sq.mean()
        else:
            self._ramp = r = self.ramp(out.step)
            v = r * self.log_var(f)
            feat = (sq / (self.cfg.eps + v.exp()) + v).mean()
        return {self.cfg.mode: self.cfg.feature_weight * feat} | ce_kd_terms(self.cfg, out)

    def metrics(self) -> dict[str, float]:
        return {"pad/ramp": self._ramp} if self.cfg.mode == "pad" else {}
