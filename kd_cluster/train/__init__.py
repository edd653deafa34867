"""The training loop of one worker, its checkpoint state and the stage plans. Never imports ray or wandb.

Planning (``plan_job``, ``StagePlan``) imports no torch; the loop and its sessions are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from kd_cluster.train.plan import StagePlan, check_here, plan_job

_LAZY = {"StageResult": "loop", "evaluate": "loop", "run_stage": "loop", "stage_done": "loop",
         "LocalSession": "session", "Session": "session"}


def __getattr__(name: str) -> Any:
    """The torch side of the package, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"kd_cluster.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LocalSession", "Session", "StagePlan", "StageResult", "check_here", "evaluate", "plan_job",
           "run_stage", "stage_done"]
