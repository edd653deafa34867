"""Teacher-inference actors (``teacher.placement: actors``): started by the driver before the training
workers, one frozen teacher each, restarted by Ray when they die. The workers reach them through
:class:`RayTeacherPool`, the Ray implementation of the pool :class:`~kd_cluster.teacher.remote.RemoteTeacher`
pipelines over.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import ray

from kd_cluster.teacher.remote import ServerConfig, TeacherReply, TeacherRequest


@ray.remote
class TeacherActor:
    """One replica: loads the teacher once (again after a restart) and answers requests in order."""

    def __init__(self, cfg: ServerConfig, threads: int) -> None:
        import torch

        from kd_cluster.teacher.remote import build_server

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


def actor_name(run: str, stage: str, i: int) -> str:
    """The Ray name of replica ``i`` of a stage's pool (for ``ray.get_actor``, e.g. to inspect or kill one)."""
    return f"kdc-teacher:{run}:{stage}:{i}"


def start_teacher_pool(plan: Any) -> list[Any]:
    """Start ``teacher.replicas`` actors for a stage and wait until each has loaded the teacher."""
    from kd_cluster.teacher.remote import server_config

    t = plan.spec.teacher
    cfg = server_config(plan)
    opts: dict[str, Any] = {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus, "max_restarts": t.max_restarts,
                            "max_task_retries": 0}  # a lost request is retried by the worker, on another replica
    if t.resource:
        opts["resources"] = {t.resource: 1}
    handles = []
    for i in range(t.replicas):
        name = actor_name(plan.run, plan.stage, i)
        with _suppress_missing():
            ray.kill(ray.get_actor(name), no_restart=True)  # a leftover of an interrupted run of this stage
        handles.append(TeacherActor.options(name=name, **opts).remote(cfg, max(1, int(t.num_cpus))))
    try:
        ray.get([h.server_id.remote() for h in handles], timeout=plan.spec.teacher.request_timeout_s * 5)
    except Exception as exc:
        stop_teacher_pool(handles)
        raise RuntimeError(f"stage {plan.stage!r}: the teacher actors did not start ({type(exc).__name__}: {exc}); "
                           f"teacher.replicas={t.replicas} x (num_cpus={t.num_cpus}, num_gpus={t.num_gpus}"
                           f"{', resource ' + repr(t.resource) if t.resource else ''}) must fit on the cluster") from exc
    return handles


def stop_teacher_pool(handles: list[Any]) -> None:
    for h in handles:
        with _suppress_missing():
            ray.kill(h, no_restart=True)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, (ValueError, ray.exceptions.RayError))





@ray.remote(num_cpus=1)
def _bench_worker(b: Any, mode: str, handles: list[Any], prefetch: int, rank: int) -> dict[str, float]:
    from kd_cluster.teacher import bench

    if mode == "colocated":
        return {"images_per_s": bench.colocated_rate(b)}
    return bench.actors_rate(b, RayTeacherPool(handles), prefetch, rank)


def bench_teacher_ray(b: Any, *, cores: int, replicas: int, prefetches: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """End-to-end rates at equal total cores: colocated = ``cores`` workers x 1 CPU; actors = ``cores -
    replicas`` workers x 1 CPU + ``replicas`` teacher actors x 1 CPU. Alternating rounds; rates are totals."""
    from kd_cluster.teacher.remote import ServerConfig  # noqa: F401 - shipped inside b

    students = cores - replicas
    if students < 1:
        raise ValueError(f"--cores {cores} leaves no core for a student worker next to {replicas} teacher actor(s)")
    handles = [TeacherActor.options(num_cpus=1, max_restarts=0).remote(b.server_config(), b.threads)
               for _ in range(replicas)]
    ray.get([h.server_id.remote() for h in handles])
    out: dict[str, list[float]] = {}
    extra: dict[str, float] = {}
    try:
        for _ in range(rounds):
            key = f"colocated: {cores} worker(s) x 1 CPU"
            res = ray.get([_bench_worker.remote(b, "colocated", [], 0, r) for r in range(cores)])
            out.setdefault(key, []).append(sum(r["images_per_s"] for r in res))
            for p in prefetches:
                key = f"actors, prefetch {p}: {students} worker(s) + {replicas} teacher(s)"
                res = ray.get([_bench_worker.remote(b, "actors", handles, p, r) for r in range(students)])
                out.setdefault(key, []).append(sum(r["images_per_s"] for r in res))
                for k in ("teacher/up_bytes_per_image", "teacher/down_bytes_per_image", "teacher/compute_p50_s",
                          "teacher/latency_p50_s", "teacher/wait_s_per_step"):
                    if k in res[0]:
                        extra[k.split("/")[1]] = res[0][k]
    finally:
        stop_teacher_pool(handles)
    return {"rounds": out, **extra}
__all__ = ["RayTeacherPool", "TeacherActor", "actor_name", "bench_teacher_ray", "start_teacher_pool", "stop_teacher_pool"]
