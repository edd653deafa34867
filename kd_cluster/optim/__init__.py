"""Optimizers and learning-rate schedules, built from the optimizer and schedule sections only.

Shampoo comes from pytorch-optimizer (``ScalableShampoo``: the blocked, grafted Shampoo of Anil et al.,
"Scalable Second Order Optimization for Deep Learning", the variant the function-matching paper's
patient runs used). Its state holds small helper objects (preconditioner and graft) besides tensors;
``shampoo_safe_globals`` lists the classes a checkpoint loader may allow for ``weights_only`` loading.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from kd_cluster.config import OptimizerSpec, ScheduleSpec


def effective_lr(spec: OptimizerSpec, global_batch_size: int) -> float:
    """The peak LR after linear batch-size scaling (when ``base_batch_size`` is set)."""
    if spec.base_batch_size is None:
        return spec.lr
    return spec.lr * global_batch_size / spec.base_batch_size


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weight matrices and kernels get weight decay; biases and norm scales do not."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(spec: OptimizerSpec, modules: Iterable[nn.Module], global_batch_size: int) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters of ``modules``."""
    lr = effective_lr(spec, global_batch_size)
    groups = param_groups(modules, spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=spec.betas)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov)
    if spec.name == "shampoo":
        return _shampoo(spec, groups, lr)
    raise AssertionError(f"unhandled optimizer {spec.name}")


def _shampoo(spec: OptimizerSpec, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    sh = spec.shampoo
    return ScalableShampoo(
        groups, lr=lr, betas=spec.betas, weight_decay=spec.weight_decay, decoupled_weight_decay=True,
        block_size=sh.block_size, preconditioning_compute_steps=sh.update_every,
        start_preconditioning_step=sh.start_step, statistics_compute_steps=sh.statistics_every,
        graft_type=LayerWiseGrafting[sh.graft.upper()], matrix_eps=sh.matrix_eps, diagonal_eps=sh.diagonal_eps,
        no_preconditioning_for_layers_with_dim_gt=sh.max_preconditioner_dim, nesterov=spec.nesterov)


def optimizer_step(optimizer: torch.optim.Optimizer, name: str, seed: int, step: int) -> None:
    """``optimizer.step()``; Shampoo's randomness (power iterations) is drawn from a generator seeded by
    (seed, step), the same on every rank, so DDP replicas stay identical and a resumed run repeats it."""
    if name != "shampoo":
        optimizer.step()
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + step) % (2**63))
        optimizer.step()


def optimizer_safe_globals() -> list[type]:
    """Classes an optimizer's state may hold besides tensors (Shampoo's helpers), for weights_only loads:
    the classes defined in pytorch-optimizer's Shampoo utility modules, and nothing else."""
    import importlib
    import inspect

    classes: list[type] = []
    for name in ("graft", "preconditioner", "partition"):
        try:
            mod = importlib.import_module(f"pytorch_optimizer.optimizer.utils.{name}")
        except ImportError:
            continue
        classes += [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__]
    return classes


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str, milestones: Sequence[int] = (),
              gamma: float = 0.1) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up from 0, then cosine to 0, quadratic
    ``(1 - progress)^2`` to 0, constant, or multistep (``gamma ** (number of milestone steps <= step)``)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "multistep":
        return gamma ** bisect.bisect_right(list(milestones), step)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "quadratic":
        return (1.0 - progress) ** 2
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def milestone_steps(spec: ScheduleSpec, num_samples: int, global_batch_size: int) -> list[int]:
    """The multistep milestones as optimizer steps (epochs converted with the split size and global batch)."""
    if spec.milestone_unit == "steps":
        return [round(m) for m in spec.milestones]
    return [round(m * num_samples / global_batch_size) for m in spec.milestones]


def build_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   decay: str, milestones: Sequence[int] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step (its state is just the step counter)."""
    ms = list(milestones)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, decay, ms, gamma))


__all__ = ["build_optimizer", "build_schedule", "effective_lr", "lr_factor", "milestone_steps",
           "optimizer_safe_globals", "optimizer_step", "param_groups"]
