"""What every method is: a torch module that turns one step's outputs into named loss terms.

A method declares what it needs (a teacher? which view of the image does the teacher see? labels?
which feature taps of student and teacher? the per-sample index?) and the training loop asks it;
nothing outside this package branches on a method's name.

Life cycle, driven by the loop on every worker:

1. ``cfg.needs()`` (the method's settings, :mod:`kd_cluster.methods.settings`; no torch, so the planner and
   ``kd-cluster validate`` ask it too) says what the loop must provide; an instance has it as ``needs``.
2. ``setup(probe, info)``: called once with the outputs of a no-grad forward on a dummy batch, so the
   method can size its own trainable modules (regressors, embeddings, heads, peer networks) and
   buffers (memory banks) from the real feature shapes. ``__init__`` must stay cheap: no modules that
   depend on shapes there.
3. The method's weights may then be loaded from ``cfg.init`` (an earlier stage's ``method.safetensors``),
   the optimizer is built over student + method parameters, and a checkpoint is restored into both.
4. Each step: ``expand(x)`` may turn the input batch into a bigger one (e.g. rotated copies), the loop
   runs the student and teacher on it and calls ``forward(StepOutputs)`` for named loss terms.

Under DDP the student is wrapped in DistributedDataParallel; the gradients of the method's own
parameters are averaged across ranks by the loop (one all-reduce per step), so every rank's method
modules stay identical. Buffers a method updates itself (memory banks) must be updated with the same
values on every rank: gather what you write with :func:`all_gather_cat`.

``MethodConfig`` and ``Needs`` are defined in :mod:`kd_cluster.methods.settings` (torch-free) and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd_cluster.methods.settings import MethodConfig, Needs


@dataclass(frozen=True)
class SetupInfo:
    """Facts about the run a method may need when it builds its modules."""

    num_classes: int
    num_samples: int
    """Samples in the train split (for memory banks indexed by the per-sample index)."""
    world_size: int
    total_steps: int
    channels: int = 3


@dataclass
class StepOutputs:
    """What the loop hands a method after the forward passes of one step."""

    student_logits: torch.Tensor | None
    """None when the method's needs say ``student=False``."""
    labels: torch.Tensor
    lam: float
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    """Per-sample dataset indices of the (un-expanded) batch, when ``needs.index``."""
    images: torch.Tensor | None = None
    """The normalised (mixed, expanded) input the student saw, for methods that run their own networks."""
    step: int = 0
    """The optimizer step being computed (0-based)."""


class Method(nn.Module):
    """A distillation method. Subclasses set ``Config`` (their settings class, which says what the method
    needs) and implement ``forward``."""

    Config: ClassVar[type[MethodConfig]]

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.needs: Needs = type(self).needs_for(cfg)

    @classmethod
    def needs_for(cls, cfg: MethodConfig) -> Needs:
        """What this method needs with these settings: the settings say it."""
        return cfg.needs()

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        """Build shape-dependent modules and buffers from a probe forward (no grad, dummy input)."""

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The batch student and teacher actually see, from the (mixed) normalised input. Default: as is."""
        return x

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Named, already weighted loss terms; the loop minimises their sum and logs each."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Extra scalars to log at log steps (host values; called on rank 0 only). Default: none."""
        return {}


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every DDP rank along dim 0 (no gradient); ``t`` itself without DDP.

    Every rank must call it with the same shape. Use it to update buffers (memory banks) identically
    on all ranks.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=0)



def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, lam: float,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against mixup targets: lam * CE(y) + (1 - lam) * CE(y rolled by one)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if lam >= 1.0:
        return ce
    ce_b = F.cross_entropy(logits, labels.roll(1, dims=0), label_smoothing=label_smoothing)
    return lam * ce + (1.0 - lam) * ce_b


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, averaged over the batch, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    ``teacher_probs`` replaces softmax(teacher_logits / T) when the target is built elsewhere.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_probs is None:
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(log_p_s, teacher_probs.float(), reduction="batchmean")
    return kl * (t * t)
