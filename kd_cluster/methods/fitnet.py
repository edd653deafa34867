"""FitNet (Romero et al., ICLR 2015): a regressor maps a student feature (the guided layer) to the shape of
a teacher feature (the hint layer); the loss is their squared distance.

Loss = ``hint_weight * mean((r(s) - t)^2) + ce_weight * CE + kd_weight * T^2 KL``.

* The distance is the mean over all elements (the CIFAR benchmark code of the CRD authors, with
  ``hint_weight`` 100), not the paper's ``1/2 * ||.||^2`` sum; the two differ by a constant factor.
* The regressor is a 1x1 conv (``regressor: conv``) or a 1x1 conv + BatchNorm (``conv_bn``); for
  vector features (e.g. a pooled ``flatten`` tap) a linear layer. The paper uses a convolutional
  regressor sized to match the two maps; a 1x1 conv keeps it small.
* Different spatial sizes: the regressed student map is resized to the teacher's (average pooling
  when it is larger, bilinear interpolation when smaller), so any guided/hint pair works.

Two-stage training as in the paper: a hint stage with ``ce_weight: 0`` (only the student up to the
guided layer and the regressor learn; later layers get zero gradients), then a ``kd`` stage that starts
from that stage's student (``student.weights: stage:hint``). Single-stage: hint + CE together.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd_cluster.methods._terms import CEKDConfig, ce_kd_terms, resize_to
from kd_cluster.methods.base import Method, Needs, SetupInfo, StepOutputs, nn, register, torch


class FitNetConfig(CEKDConfig):
    """Settings of ``fitnet``."""

    student_layer: str = Field(description="Student feature tap (the guided layer), e.g. layer2.")
    teacher_layer: str = Field(description="Teacher feature tap (the hint layer), e.g. layer2.")
    hint_weight: float = Field(100.0, ge=0.0, description="Weight of the hint loss (mean squared error).")
    regressor: Literal["conv", "conv_bn"] = Field("conv", description="conv: 1x1 conv; conv_bn: 1x1 conv "
                                                  "+ BatchNorm (a linear layer for vector features).")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


@register("fitnet")
class FitNet(Method):
    """Hint-based training through a learned regressor."""

    Config = FitNetConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        s = probe.student_features[self.cfg.student_layer]
        t = probe.teacher_features[self.cfg.teacher_layer]
        if s.ndim != t.ndim or s.ndim not in (2, 4):
            raise ValueError(f"fitnet: student_layer {self.cfg.student_layer!r} gives shape {list(s.shape[1:])} and "
                             f"teacher_layer {self.cfg.teacher_layer!r} gives {list(t.shape[1:])}; both must be "
                             "feature maps [C, H, W] or both vectors [C]")
        bn = self.cfg.regressor == "conv_bn"
        if s.ndim == 4:
            layers: list[nn.Module] = [nn.Conv2d(s.shape[1], t.shape[1], 1, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(t.shape[1]))
        else:
            layers = [nn.Linear(s.shape[1], t.shape[1], bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm1d(t.shape[1]))
        self.regressor = nn.Sequential(*layers)

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        t = out.teacher_features[self.cfg.teacher_layer]
        r = self.regressor(out.student_features[self.cfg.student_layer])
        if r.ndim == 4:
            r = resize_to(r, t.shape[-2:])
        terms = {"hint": self.cfg.hint_weight * (r - t).pow(2).mean()}
        return terms | ce_kd_terms(self.cfg, out)
