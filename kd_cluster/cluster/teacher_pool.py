"""Teacher-inference actors (``teacher.placement: actors``): started by the driver before the training
workers, one frozen teacher each (one pool per ensemble member), restarted by Ray when they die. The workers
reach them through :class:`RayTeacherPool`, the Ray implementation of the pool
:class:`~kd_cluster.teacher.remote.RemoteTeacher` pipelines over.

:data:`RAY_PLACEMENTS` is the Ray half of the placements that need one: how the driver starts a stage's
pools (per member name, a list of actor handles), how many CPUs they take, and how they are stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import ray

from kd_cluster.teacher import MemberPlan, TeacherPlan
from kd_cluster.teacher.remote import ServerConfig, TeacherReply, TeacherRequest, server_config


@ray.remote
class TeacherActor:
    """One replica: loads the teacher once (again after a restart) and answers requests in order."""

    def __init__(self, cfg: ServerConfig, threads: int) -> None:
        import torch

        from kd_cluster.models import keep_freed_memory
        from kd_cluster.teacher.remote import build_server

        keep_freed_memory()
        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.server = build_server(cfg, device)

    def infer(self, req: TeacherRequest) -> TeacherReply:
        return self.server.infer(req)

    def server_id(self) -> str:
        return self.server.server_id


class RayTeacherPool:
    """The pool a training worker sees: ``submit`` is a remote call on replica ``i``'s actor."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = list(handles)
        self.size = len(self.handles)

    def submit(self, replica: int, req: TeacherRequest) -> Future:
        return self.handles[replica].infer.remote(req).future()

    def close(self) -> None:
        pass  # the driver owns the actors


def actor_name(run: str, stage: str, i: int, member: str = "teacher") -> str:
    """The Ray name of replica ``i`` of a stage's pool (of an ensemble ``member``'s pool), for
    ``ray.get_actor``, e.g. to inspect or kill one."""
    base = f"kdc-teacher:{run}:{stage}:{i}"
    return base if member == "teacher" else f"{base}:{member}"


def start_teacher_pool(run: str, stage: str, teacher: TeacherPlan, member: MemberPlan) -> list[Any]:
    """Start ``member.replicas`` actors for one member of a stage's teacher and wait until each has loaded it."""
    cfg = server_config(teacher, member)
    opts: dict[str, Any] = {"num_cpus": member.num_cpus, "num_gpus": member.num_gpus,
                            "max_restarts": teacher.max_restarts,
                            "max_task_retries": 0}  # a lost request is retried by the worker, on another replica
    if member.resource:
        opts["resources"] = {member.resource: 1}
    handles = []
    for i in range(member.replicas):
        name = actor_name(run, stage, i, member.name)
        with _suppress_missing():
            ray.kill(ray.get_actor(name), no_restart=True)  # a leftover of an interrupted run of this stage
        handles.append(TeacherActor.options(name=name, **opts).remote(cfg, max(1, int(member.num_cpus))))
    try:
        ray.get([h.server_id.remote() for h in handles], timeout=teacher.request_timeout_s * 5)
    except Exception as exc:
        stop_teacher_pool(handles)
        what = "the teacher actors" if member.name == "teacher" else f"the actors of teacher member {member.name!r}"
        raise RuntimeError(f"stage {stage!r}: {what} did not start ({type(exc).__name__}: {exc}); "
                           f"replicas={member.replicas} x (num_cpus={member.num_cpus}, num_gpus={member.num_gpus}"
                           f"{', resource ' + repr(member.resource) if member.resource else ''}) must fit on the "
                           "cluster") from exc
    return handles


def start_teacher_pools(run: str, stage: str, teacher: TeacherPlan) -> dict[str, list[Any]]:
    """One pool per member of the stage's teacher (all stopped again if one fails to start)."""
    pools: dict[str, list[Any]] = {}
    try:
        for m in teacher.members:
            pools[m.name] = start_teacher_pool(run, stage, teacher, m)
    except Exception:
        stop_teacher_pools(pools)
        raise
    return pools


def stop_teacher_pools(pools: dict[str, list[Any]]) -> None:
    for handles in pools.values():
        stop_teacher_pool(handles)


def teacher_pool_cpus(teacher: TeacherPlan) -> int:
    """CPUs the stage's teacher actors take (to size a local Ray instance)."""
    return sum(math.ceil(m.replicas * m.num_cpus) for m in teacher.members)


@dataclass(frozen=True)
class RayPlacement:
    """The Ray half of a teacher placement."""

    start: Callable[[str, str, TeacherPlan], dict[str, list[Any]]]
    """(run, stage, teacher) -> per member name, the handles workers reach the teacher through."""
    stop: Callable[[dict[str, list[Any]]], None]
    cpus: Callable[[TeacherPlan], int]


RAY_PLACEMENTS: dict[str, RayPlacement] = {
    "actors": RayPlacement(start_teacher_pools, stop_teacher_pools, teacher_pool_cpus),
}
"""``teacher.placement`` -> how the driver starts its pools; placements not listed need nothing from the driver."""


def worker_pools(handles: dict[str, list[Any]] | None) -> dict[str, RayTeacherPool] | None:
    """On a training worker: the pools over the handles the driver passed (None when it started none)."""
    return {name: RayTeacherPool(h) for name, h in handles.items()} if handles else None


def stop_teacher_pool(handles: list[Any]) -> None:
    for h in handles:
        with _suppress_missing():
            ray.kill(h, no_restart=True)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, (ValueError, ray.exceptions.RayError))


__all__ = ["RAY_PLACEMENTS", "RayPlacement", "RayTeacherPool", "TeacherActor", "actor_name",
           "start_teacher_pool", "start_teacher_pools", "stop_teacher_pool", "stop_teacher_pools", "teacher_pool_cpus",
           "worker_pools"]
