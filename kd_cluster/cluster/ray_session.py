"""The Ray Train side of a training worker: a :class:`~kd_cluster.train.Session` over ``ray.train``."""

from __future__ import annotations

import logging
import sys
import threading

import ray.train
import ray.train.torch

from kd_cluster.train.preempt import PreemptionFlag

log = logging.getLogger(__name__)


class RaySession:
    """Rank and device from Ray Train; preemption from SIGTERM and from Train's node-preemption notice."""

    def __init__(self, grace_s: float) -> None:
        # Train logs every report (all metrics) at INFO from each worker, under a logger named after its
        # file; our progress lines say it once. Guarded: it is Train's internal module.
        ctx_mod = sys.modules.get("ray.train.v2._internal.execution.context")
        if ctx_mod is not None and getattr(ctx_mod, "__file__", None):
            logging.getLogger(ctx_mod.__file__).setLevel(logging.WARNING)
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.interactive = False  # output is forwarded line by line to the driver
        self.preemption = PreemptionFlag()
        self.preemption.poll = _preemption_notice
        _hook_worker_sigterm(self.preemption, grace_s)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Progress for Ray's dashboard and Train's run state (no checkpoint: those are ours)."""
        ray.train.report(metrics)


def _preemption_notice() -> str | None:
    """Ray Train's notice that a node of this worker group is being drained (spot reclaim); a barrier."""
    get = getattr(ray.train, "get_preemption_info", None)
    if get is None:
        return None
    info = get()
    return f"node preemption notice for ranks {info.preempted_ranks}" if info is not None else None


def _hook_worker_sigterm(flag: PreemptionFlag, grace_s: float) -> None:
    """Make SIGTERM on this Ray worker raise the flag and give the loop ``grace_s`` to checkpoint.

    The training function runs in a thread of the worker, and Python installs signal handlers only from
    the main thread, where Ray's worker loop already handles SIGTERM by exiting through
    ``ray._private.worker.raise_sys_exit_with_custom_error_message``. We wrap that function: raise the
    flag, wait until the loop's checkpoint is durable (or the grace period ends), then exit as before.
    """
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # pragma: no cover - internal layout changed: SIGTERM then just ends the worker
        return
    original = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
    if original is None or getattr(original, "_kd_cluster_hook", False):
        return

    def on_exit(message: str, exit_code: int = 0):  # type: ignore[no-untyped-def]
        if "SIGTERM" in message and threading.current_thread() is threading.main_thread():
            flag.request("SIGTERM")
            flag.saved.wait(grace_s)
        return original(message, exit_code)

    on_exit._kd_cluster_hook = True  # type: ignore[attr-defined]
    ray_worker.raise_sys_exit_with_custom_error_message = on_exit
