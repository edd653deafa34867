"""``kd-cluster bench teacher`` on a Ray cluster: every figure measured by Ray tasks on one node's cores, the
teacher actors being the very :class:`~kd_cluster.cluster.teacher_pool.TeacherActor` a run starts."""

from __future__ import annotations

from typing import Any

import ray

from kd_cluster.cluster.teacher_pool import RayTeacherPool, TeacherActor, stop_teacher_pool


@ray.remote(num_cpus=1)
def _bench_worker(b: Any, mode: str, handles: list[Any], prefetch: int, rank: int, world: int,
                  init_method: str | None) -> dict[str, float]:
    from kd_cluster.bench import teacher_rates as bench

    if mode == "student":
        return {"images_per_s": bench.student_rate(b)}
    if mode == "teacher":
        return {"images_per_s": bench.teacher_rate(b)}
    with bench.worker_group(world, rank, init_method):
        if mode == "colocated":
            return {"images_per_s": bench.colocated_rate(b)}
        return bench.actors_rate(b, RayTeacherPool(handles), prefetch, rank)


@ray.remote(num_cpus=0)
def _rendezvous() -> str:
    """A TCP address for a gloo group on this node (a free port of its IP)."""
    import socket

    ip = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((ip, 0))
        port = sock.getsockname()[1]
    return f"tcp://{ip}:{port}"


def bench_teacher_ray(b: Any, *, cores: int, replicas: int, prefetches: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """End-to-end rates at equal total cores on one node: colocated = ``cores`` DDP workers x 1 CPU; actors =
    ``cores - replicas`` DDP workers x 1 CPU + ``replicas`` teacher actors x 1 CPU. Alternating rounds."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    students = cores - replicas
    if students < 1:
        raise ValueError(f"--cores {cores} leaves no core for a student worker next to {replicas} teacher actor(s)")
    # one bundle per core, all on one node: both configurations run on the same cores
    pg = placement_group([{"CPU": 1}] * cores, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=120)
    except Exception as exc:
        remove_placement_group(pg)
        raise RuntimeError(f"--cores {cores}: no node of the cluster has {cores} free CPUs for the benchmark") from exc

    def on(i: int) -> dict[str, Any]:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}

    def workers(mode: str, n: int, first_bundle: int, handles: list[Any], prefetch: int) -> list[dict[str, float]]:
        addr = ray.get(_rendezvous.options(**on(first_bundle)).remote()) if n > 1 else None
        return ray.get([_bench_worker.options(**on(first_bundle + r)).remote(b, mode, handles, prefetch, r, n, addr)
                        for r in range(n)])

    # the teacher actors hold no CPU of their bundle (they idle, blocked on their queue, while the colocated
    # workers use every core); each computes on ``b.threads`` torch threads
    handles = [TeacherActor.options(num_cpus=0, max_restarts=0, **on(students + i)).remote(b.server_config(), b.threads)
               for i in range(replicas)]
    out: dict[str, list[float]] = {}
    extra: dict[str, Any] = {}
    try:
        ray.get([h.server_id.remote() for h in handles])
        for _ in range(rounds):  # every configuration once per round, so a slow spell of the machine hits all
            extra.setdefault("student_rates", []).append(workers("student", 1, 0, [], 0)[0]["images_per_s"])
            extra.setdefault("teacher_rates", []).append(workers("teacher", 1, 0, [], 0)[0]["images_per_s"])
            key = f"colocated: {cores} DDP worker(s) x 1 CPU"
            out.setdefault(key, []).append(sum(r["images_per_s"] for r in workers("colocated", cores, 0, [], 0)))
            for p in prefetches:
                key = f"actors, prefetch {p}: {students} worker(s) + {replicas} teacher(s)"
                res = workers("actors", students, 0, handles, p)
                out.setdefault(key, []).append(sum(r["images_per_s"] for r in res))
                extra.setdefault("teacher_metrics", {})[p] = {k.split("/")[1]: v for k, v in res[0].items()
                                                              if k.startswith("teacher/")}
    finally:
        stop_teacher_pool(handles)
        remove_placement_group(pg)
    return {"rounds": out, **extra}




__all__ = ["bench_teacher_ray"]
