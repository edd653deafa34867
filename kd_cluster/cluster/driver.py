"""The driver: plans a job, skips finished stages, runs each remaining stage as a Ray Train run.

The driver only builds configs and calls ``fit``; the training itself is ``kd_cluster.train.run_stage``,
the same function ``--no-ray`` calls in one process.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from kd_cluster.cluster.local_ray import ensure_ray
from kd_cluster.config import JobSpec, with_settings
from kd_cluster.storage import Store, storage_options
from kd_cluster.urls import absolute, is_remote, join
from kd_cluster.storage.lease import RunLease
from kd_cluster.train import LocalSession, StagePlan, check_here, plan_job, run_stage, stage_done


class StageFailed(RuntimeError):
    """A stage's Ray Train workers failed; the message names the stage and the first worker error."""


@dataclass
class JobResult:
    """Per-stage outcome of a job run (read back from each stage's completion marker)."""

    run: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _train_fn(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    from kd_cluster.cluster.ray_session import RaySession

    from kd_cluster.cluster.teacher_pool import worker_pools

    plan = config["plan"]
    run_stage(plan, RaySession(plan.spec.fault_tolerance.preemption_grace_s),
              teacher_pools=worker_pools(config.get("teacher_pools")))


def _storage_for_ray(root: str, endpoint: str | None) -> tuple[str, Any]:
    """Ray's (storage_path, storage_filesystem) for a local folder or any fsspec URL."""
    if not is_remote(root):
        return root, None
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(root, **storage_options(root, endpoint))
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_placement(plan: StagePlan) -> Any:
    """The Ray half of the stage's teacher placement (starting its pools), or None when it needs none."""
    if plan.teacher is None:
        return None
    from kd_cluster.cluster.teacher_pool import RAY_PLACEMENTS

    return RAY_PLACEMENTS.get(plan.teacher.placement)


def stage_cpus(plan: StagePlan) -> int:
    """CPUs a stage takes on Ray: its training workers and its teacher's actor pools."""
    need = math.ceil(plan.spec.resources.num_workers * plan.spec.resources.cpus_per_worker)
    placement = ray_placement(plan)
    return need + (placement.cpus(plan.teacher) if placement is not None else 0)


def fit_stage_ray(plan: StagePlan) -> None:
    """One stage as a Ray Train ``TorchTrainer`` run (DDP: gloo on CPU, NCCL on GPU).

    A teacher placement with a Ray half (``actors``) has its pools started first (each actor loads its
    teacher), handed to the workers in the loop config, and stopped when the stage ends."""
    placement = ray_placement(plan)
    pools: dict[str, list[Any]] = {}
    if placement is not None:
        pools = placement.start(plan.run, plan.stage, plan.teacher)
    try:
        _fit(plan, pools)
    finally:
        if placement is not None:
            placement.stop(pools)


def _fit(plan: StagePlan, teacher_pools: dict[str, list[Any]]) -> None:
    from ray.train import (FailureConfig, LoggingConfig, RunConfig, ScalingConfig,
                           TrainingFailedError)
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = plan.spec
    res = spec.resources
    root = plan.stage_url.rsplit("/", 1)[0]
    path, fs = _storage_for_ray(root, spec.storage.endpoint_url)
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"plan": plan, "teacher_pools": teacher_pools},
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RunConfig(name=plan.stage, storage_path=path, storage_filesystem=fs,
                             # restarts resume from our own checkpoints (<stage>/checkpoints), not Train's
                             failure_config=FailureConfig(max_failures=spec.fault_tolerance.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        failures = getattr(exc, "worker_failures", None) or {}
        first = str(failures[min(failures)]) if failures else str(exc)
        lines = [ln for ln in first.strip().splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else type(exc).__name__
        raise StageFailed(f"stage {plan.stage!r} of run {plan.run!r} failed on its Ray workers: {detail} "
                          "(checkpoints are kept: fix the cause and re-run the same command to resume)") from exc


RESOLVED_SPEC = "job.json"


def run_root(spec: JobSpec) -> str:
    """The run's folder: ``<storage.path>/<name>`` (stages, checkpoints and the resolved spec live here)."""
    return join(absolute(spec.storage.path), spec.name)


def save_resolved_spec(spec: JobSpec, source: str) -> None:
    """Store the fully resolved spec next to the run's checkpoints, so ``kd-cluster resume`` needs only the
    run's URL. The spec holds no credentials (they only ever come from the environment)."""
    Store(run_root(spec), spec.storage.endpoint_url).write_json(
        RESOLVED_SPEC, {"source": source, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "spec": spec.model_dump(mode="json")})


def load_resolved_spec(run_url: str, endpoint_url: str | None = None) -> JobSpec:
    """The spec a run was last started with, read from ``<run_url>/job.json``."""
    store = Store(absolute(run_url), endpoint_url)
    if not store.exists(RESOLVED_SPEC):
        raise FileNotFoundError(f"no {RESOLVED_SPEC} under {run_url!r}: not a kd-cluster run folder "
                                "(expected <storage.path>/<run name>)")
    return JobSpec.model_validate(store.read_json(RESOLVED_SPEC)["spec"])


def run_lease(spec: JobSpec, force: bool = False) -> RunLease:
    """Take the run's lease (one driver writes a run at a time): raises :class:`LeaseHeld` naming the live
    owner; ``force`` takes over a lease whose heartbeat is older than ``fault_tolerance.lease_timeout_s``.
    Use as a context manager: the lease is given back when the block ends."""
    lease = RunLease(Store(run_root(spec), spec.storage.endpoint_url),
                     timeout_s=spec.fault_tolerance.lease_timeout_s, run=spec.name)
    lease.acquire(force=force)
    return lease


def run_job(spec: JobSpec, source: str, *, use_ray: bool = True, address: str | None = None,
            on_stage: Any = None) -> JobResult:
    """Run every unfinished stage of a job in order; a re-run resumes the unfinished stage."""
    t0 = time.perf_counter()
    plans = plan_job(spec, source, check_data="all")
    if not use_ray or not (address or os.environ.get("RAY_ADDRESS")):
        check_here(plans, source)  # the stages train on this machine
    save_resolved_spec(spec, source)
    result = JobResult(run=spec.name)
    for plan in plans:
        marker = stage_done(plan)
        if marker is not None:
            result.stages[plan.stage] = marker
            result.skipped.append(plan.stage)
            continue
        if on_stage:
            on_stage(plan)
        if plan.labels is not None:  # a stage that stores the teacher's predictions
            from kd_cluster.cluster.labeling import run_label_stage

            result.stages[plan.stage] = run_label_stage(plan, use_ray=use_ray, address=address)
            continue
        if use_ray:
            # a local instance is sized once, for the largest stage still to run (a later stage with teacher
            # actors needs more CPUs than a first, supervised one; Ray cannot grow a started instance)
            pending = [p for p in plans if p.stage not in result.stages and p.labels is None]
            ensure_ray(address, max(max(stage_cpus(p) for p in pending), os.cpu_count() or 1))
            fit_stage_ray(plan)
        else:
            if plan.spec.resources.num_workers != 1:
                print(f"[{plan.stage}] --no-ray runs one process: resources.num_workers "
                      f"{plan.spec.resources.num_workers} -> 1 (global batch unchanged)")
                plan.spec = with_settings(plan.spec, {"resources": {"num_workers": 1}})
            run_stage(plan, LocalSession())
        marker = stage_done(plan)
        assert marker is not None, f"stage {plan.stage} finished without its completion marker"
        result.stages[plan.stage] = marker
    result.wall_s = time.perf_counter() - t0
    return result


__all__ = ["RESOLVED_SPEC", "JobResult", "StageFailed", "ensure_ray", "fit_stage_ray", "load_resolved_spec", "run_job",
           "run_lease", "run_root", "save_resolved_spec", "stage_cpus"]
