"""``kd-cluster eval --num-workers N``: N Ray tasks, each evaluating one rank's share of the split (as training's
evaluation splits it); their counts add up to the result of one pass."""

from __future__ import annotations

import functools
import time

from kd_cluster.results.evaluate import EvalCounts, EvalTask, evaluate_share


def evaluate_on_ray(task: EvalTask, num_workers: int, *, address: str | None = None, cpus_per_worker: float = 1.0,
                    gpus_per_worker: float = 0.0) -> tuple[EvalCounts, float]:
    """The added-up counts of ``num_workers`` shares, and the wall time from submitting the tasks to the last
    result (model loading included)."""
    import ray

    from kd_cluster.cluster import ensure_ray

    ensure_ray(address, max(1, int(num_workers * cpus_per_worker + 0.999)))
    share = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_retries=1)(evaluate_share)
    t0 = time.perf_counter()
    parts = ray.get([share.remote(task, rank, num_workers) for rank in range(num_workers)])
    return functools.reduce(lambda a, b: a + b, parts), time.perf_counter() - t0


__all__ = ["evaluate_on_ray"]
