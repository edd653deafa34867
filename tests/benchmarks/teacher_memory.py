"""Memory of the teacher-actor pipeline over a long run: the student worker's and the teacher actor's RSS.

    .venv/bin/python tests/benchmarks/teacher_memory.py [--steps 2000] [--every 100] [--taps stage2]

A student worker (a Ray task, 1 CPU) trains on synthetic uint8 batches while one teacher actor (1 CPU)
answers its pipelined requests (``--prefetch`` steps ahead, at most ``--max-in-flight``). With a feature
tap the replies are larger than Ray's inline limit, so they travel through the object store. Every
``--every`` steps the worker records its own RSS and the actor's; the table shows them, and the growth
between the first sample after warm-up and the last. ``--no-ray`` runs the same loop in one process over
the in-process pool.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from kd_cluster.bench.teacher_rates import BenchSetup, _batches, _Student
from kd_cluster.teacher.remote import RemoteTeacher, ServerConfig


def _rss_mb(pid: int) -> tuple[float, float]:
    """(private, shared) resident MB of a process on this node, from /proc (Linux). Shared memory is mostly the
    pages of Ray's object store the process has mapped, which stay mapped as the store hands out new space."""
    with open(f"/proc/{pid}/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k.startswith("Rss")}
    return kb.get("RssAnon", 0) / 1024, (kb.get("RssShmem", 0) + kb.get("RssFile", 0)) / 1024


def run_worker(b: BenchSetup, cfg: ServerConfig, pool: Any, actor_pid: int, a: dict[str, Any]) -> list[dict[str, float]]:
    """The student loop; returns one sample per ``every`` steps."""
    torch.set_num_threads(1)
    dev = torch.device("cpu")
    st, xs = _Student(b, dev), _batches(b, 8)
    rt = RemoteTeacher(pool, dev, prefetch=a["prefetch"], max_in_flight=a["max_in_flight"])
    stream = ({"image": xs[s % len(xs)], "step": s} for s in range(a["steps"]))
    samples, t0 = [], time.perf_counter()
    for batch in rt.feed(stream, lambda s: 0.7):
        logits, feats = rt.outputs(batch["teacher_out"])
        x = st.inputs(batch["image"])
        s_logits = st.model(x)
        loss = F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(logits, 1), reduction="batchmean", log_target=True)
        loss = loss + sum(f.float().mean() * 0 for f in feats.values())  # the features are received and used
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        step = batch["step"] + 1
        if step % a["every"] == 0:
            m = rt.metrics()
            (w_anon, w_shared), (a_anon, a_shared) = _rss_mb(os.getpid()), _rss_mb(actor_pid)
            samples.append({"step": step, "worker_rss_mb": w_anon, "actor_rss_mb": a_anon,
                            "worker_shared_mb": w_shared, "actor_shared_mb": a_shared,
                            "queue_depth_max": m.get("teacher/queue_depth_max", 0.0),
                            "down_bytes_per_image": m.get("teacher/down_bytes_per_image", 0.0),
                            "elapsed_s": time.perf_counter() - t0})
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--student", default="cnn_xs")
    ap.add_argument("--teacher", default="cnn_s")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--taps", nargs="*", default=["stage2"], help="teacher features to return (none: logits only)")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--max-in-flight", type=int, default=4)
    ap.add_argument("--no-ray", action="store_true")
    a = vars(ap.parse_args())
    b = BenchSetup(student=a["student"], teacher=a["teacher"], batch=a["batch"], image_size=28, channels=1,
                   num_classes=10, steps=a["steps"])
    cfg = ServerConfig(arch=b.teacher, num_classes=10, channels=1, weights=None, endpoint_url=None,
                       taps=tuple(a["taps"]), mean=[0.5], std=[0.25], method_name="funmatch")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; student {b.student}, teacher "
          f"{b.teacher}, batch {b.batch}, taps {list(cfg.taps)}, prefetch {a['prefetch']}, "
          f"max_in_flight {a['max_in_flight']}, {a['steps']} steps, {'one process' if a['no_ray'] else 'Ray'}")
    if a["no_ray"]:
        from kd_cluster.teacher.remote import LocalPool, build_server

        pool = LocalPool([build_server(cfg, torch.device("cpu"))])
        samples = run_worker(b, cfg, pool, os.getpid(), a)
        pool.close()
    else:
        import ray

        from kd_cluster.cluster.teacher_pool import RayTeacherPool, TeacherActor

        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        actor = TeacherActor.options(num_cpus=1, max_restarts=0).remote(cfg, 1)
        ray.get(actor.server_id.remote())
        actor_pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        task = ray.remote(num_cpus=1)(run_worker)
        samples = ray.get(task.remote(b, cfg, RayTeacherPool([actor]), actor_pid, a))
        ray.shutdown()
    print("private = RssAnon (the process's own memory); shared = RssShmem + RssFile (object store pages, libraries)")
    print(f"{'step':>6} {'worker private MB':>18} {'shared':>8} {'actor private MB':>17} {'shared':>8} "
          f"{'max in flight':>14} {'down B/img':>11} {'s':>7}")
    for s in samples:
        print(f"{s['step']:>6} {s['worker_rss_mb']:>18.1f} {s['worker_shared_mb']:>8.1f} {s['actor_rss_mb']:>17.1f} "
              f"{s['actor_shared_mb']:>8.1f} {s['queue_depth_max']:>14.0f} {s['down_bytes_per_image']:>11.0f} "
              f"{s['elapsed_s']:>7.1f}")
    if len(samples) >= 3:
        first, last = samples[1], samples[-1]  # after warm-up (allocator pools, first-touch pages)
        print(f"private memory growth from step {first['step']} to {last['step']}: worker "
              f"{last['worker_rss_mb'] - first['worker_rss_mb']:+.1f} MB, actor "
              f"{last['actor_rss_mb'] - first['actor_rss_mb']:+.1f} MB; shared: worker "
              f"{last['worker_shared_mb'] - first['worker_shared_mb']:+.1f} MB, actor "
              f"{last['actor_shared_mb'] - first['actor_shared_mb']:+.1f} MB")


if __name__ == "__main__":
    main()
