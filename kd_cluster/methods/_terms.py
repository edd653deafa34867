"""Pieces shared by the feature-based methods: the label CE and logit-KD terms, feature shape helpers."""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import F, MethodConfig, StepOutputs, mixed_cross_entropy, soft_kl, torch


class CEKDConfig(MethodConfig):
    """Weights of the label cross-entropy and of the optional logit KD a feature method adds to its own loss."""

    ce_weight: float = Field(1.0, ge=0.0, description="Weight of the label cross-entropy (mixup-aware).")
    kd_weight: float = Field(0.0, ge=0.0, description="Weight of T^2 * KL(p_t^T || p_s^T) on the logits (0: off).")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the KD term.")


def ce_kd_terms(cfg: CEKDConfig, out: StepOutputs) -> dict[str, torch.Tensor]:
    """``ce`` and ``kl`` terms, already weighted; a term with weight 0 is left out.

    When both weights are 0 (a hint stage), a ``0 * logits`` term keeps every student parameter in the
    autograd graph, so DDP finds a gradient for each (it fails on parameters that get none) - the layers
    after the guided one then get zero gradients.
    """
    terms: dict[str, torch.Tensor] = {}
    s = out.student_logits
    assert s is not None
    if cfg.ce_weight:
        terms["ce"] = cfg.ce_weight * mixed_cross_entropy(s, out.labels, out.lam)
    if cfg.kd_weight:
        assert out.teacher_logits is not None
        terms["kl"] = cfg.kd_weight * soft_kl(s, out.teacher_logits, cfg.temperature)
    if not terms:
        terms["unused"] = 0.0 * s.sum()
    return terms


def pooled(f: torch.Tensor) -> torch.Tensor:
    """A feature as one vector per sample: global average pool of a map ``[N, C, H, W]``, or ``[N, C]`` as is."""
    if f.ndim == 4:
        return f.mean(dim=(2, 3))
    if f.ndim == 2:
        return f
    return f.flatten(1)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map ``[N, C, H, W]`` at spatial ``size``: average-pooled when larger in both sides, else bilinear."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
