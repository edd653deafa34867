"""Plain supervised training with cross-entropy: teachers trained as a job stage, from-scratch baselines."""

from __future__ import annotations

import torch

from kd_cluster.methods.base import Method, StepOutputs, mixed_cross_entropy
from kd_cluster.methods.settings import SupervisedConfig


class Supervised(Method):
    """Cross-entropy on the labels (mixup-aware); no teacher."""

    Config = SupervisedConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        return {"ce": mixed_cross_entropy(out.student_logits, out.labels, out.lam, self.cfg.label_smoothing)}
