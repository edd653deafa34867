"""What a checkpoint holds and how it is written and read back (``weights_only=True`` on load).

Rank 0 writes ``state.pt`` (model, method modules, optimizer, LR schedule, step, run metadata);
every rank writes ``rng-rank<r>.pt`` (its torch CPU/CUDA and Python RNG states). The data cursor is
the step itself: streams are pure functions of (seed, rank, loader worker, step).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def save_state(d: Path, rank: int, *, step: int, model: nn.Module, method: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into folder ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save({
            "step": step,
            "model": _unwrap(model).state_dict(),
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "meta": meta,
        }, d / "state.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, d / f"rng-rank{rank}.pt")


def load_state(d: Path, rank: int, *, model: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any) -> tuple[int, dict[str, Any]]:
    """Restore from folder ``d``; returns (step, meta). RNG states are restored for this rank."""
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    _unwrap(model).load_state_dict(state["model"])
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = d / f"rng-rank{rank}.pt"
    if rng_file.exists():  # a run resumed with more workers than it had: new ranks keep their fresh seeds
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"]), dict(state["meta"])


__all__ = ["load_state", "save_state"]
