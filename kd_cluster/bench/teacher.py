"""``kd-cluster bench teacher``: how fast the student steps, how fast the teacher answers, and what a training
worker reaches with the teacher colocated or on teacher actors, round by round (:func:`measure`). The rates
themselves are :mod:`kd_cluster.bench.teacher_rates`; on Ray they run as tasks of
:mod:`kd_cluster.bench.teacher_ray`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from kd_cluster.bench.teacher_rates import BenchSetup, colocated_rate, student_rate, teacher_rate


def summarize(rounds: dict[str, list[float]], s_rate: float, t_rate: float) -> dict[str, Any]:
    """Medians of the rounds; each configuration's median ratio to the colocated rate of the same round (the
    machine's speed drifts between rounds, less within one); the replicas to keep one student busy; ceilings."""
    med = {k: statistics.median(v) for k, v in rounds.items() if v}
    base = next((v for k, v in rounds.items() if k.startswith("colocated")), None)
    ratios = {k: statistics.median(a / c for a, c in zip(v, base, strict=False)) for k, v in rounds.items()
              if base and v and not k.startswith("colocated")}
    return {"medians": med, "ratios": ratios, "rounds": rounds, "student_rate": s_rate, "teacher_rate": t_rate,
            "replicas_per_student": math.ceil(s_rate / t_rate) if t_rate else None,
            "colocated_ceiling": 1.0 / (1.0 / s_rate + 1.0 / t_rate) if s_rate and t_rate else None,
            "separate_teacher_ceiling": min(s_rate, t_rate) if s_rate and t_rate else None}


def summarize_compile(eager: dict[str, list[float]], compiled: dict[str, list[float]]) -> dict[str, Any]:
    """Per figure (student, teacher, colocated): median images/s uncompiled and compiled, and the median of the
    per-round ratios compiled / uncompiled (both measured in the same round)."""
    return {k: {"eager": statistics.median(eager[k]), "compiled": statistics.median(compiled[k]),
                "ratio": statistics.median(c / e for c, e in zip(compiled[k], eager[k], strict=True)),
                "rounds_eager": eager[k], "rounds_compiled": compiled[k]} for k in eager}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{'configuration':<50} {'images/s':>10} {'vs colocated':>13}"]
    lines.append(f"{'student step alone (1 worker)':<50} {res['student_rate']:>10.1f}")
    lines.append(f"{'teacher forward alone (1 replica)':<50} {res['teacher_rate']:>10.1f}")
    for k, v in res.get("medians", {}).items():
        r = res.get("ratios", {}).get(k)
        lines.append(f"{k:<50} {v:>10.1f} {f'{r:.2f}x' if r is not None else '':>13}")
    if res.get("replicas_per_student"):
        lines.append(f"teacher replicas to keep one student worker busy: {res['replicas_per_student']} "
                     f"(ceil({res['student_rate']:.1f} / {res['teacher_rate']:.1f}))")
        lines.append(f"one worker, colocated ceiling 1/(1/S+1/T): {res['colocated_ceiling']:.1f} images/s; "
                     f"with one separate teacher replica min(S, T): {res['separate_teacher_ceiling']:.1f} images/s")
    tm = res.get("teacher_metrics") or {}
    if tm:
        lines.append(f"{'first worker, per step':<28} {'prefetch':>8} {'latency p50 s':>14} {'compute p50 s':>14} "
                     f"{'wait s/step':>12}")
        for p, m in tm.items():
            lines.append(f"{'':<28} {p:>8} {m.get('latency_p50_s', float('nan')):>14.4f} "
                         f"{m.get('compute_p50_s', float('nan')):>14.4f} {m.get('wait_s_per_step', float('nan')):>12.4f}")
        m = next(iter(tm.values()))
        if "up_bytes_per_image" in m:
            lines.append(f"bytes per image: {m['up_bytes_per_image']:.1f} up (uint8 crops), "
                         f"{m['down_bytes_per_image']:.1f} down (teacher outputs)")
    comp = res.get("compile")
    if comp:
        lines.append(f"{'torch.compile (same rounds)':<40} {'uncompiled':>11} {'compiled':>10} {'ratio':>7}")
        for k, v in comp.items():
            lines.append(f"{k:<40} {v['eager']:>11.1f} {v['compiled']:>10.1f} {v['ratio']:>6.2f}x")
    if "load" in res:
        lines.append(f"load average before / after: {res['load']}")
    return "\n".join(lines)


def setup_for(plan: Any, *, batch: int | None, steps: int, warmup: int = 10, threads: int = 1) -> BenchSetup:
    """The benchmark of a stage's student and (first) teacher member: the job's architectures, per-worker batch
    (or ``batch``), image size, classes and the resources' amp, channels-last and compile settings."""
    spec = plan.spec
    return BenchSetup(student=plan.arch, teacher=plan.teacher.members[0].arch,
                      batch=batch or max(1, spec.data.batch_size // spec.resources.num_workers),
                      image_size=spec.data.image_size, channels=plan.channels or 3,
                      num_classes=plan.num_classes or 1000, steps=steps, warmup=warmup, threads=threads,
                      amp=spec.resources.amp, channels_last=spec.resources.channels_last,
                      compile=spec.resources.compile)


def measure(b: BenchSetup, *, rounds: int, use_ray: bool = True, compare_compile: bool = False,
            address: str | None = None, cores: int = 2, replicas: int = 1,
            prefetches: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """Every figure of ``bench teacher``, ``rounds`` alternating rounds, summarised (:func:`summarize`) with the
    load average before and after. Without Ray: student alone, teacher alone and colocated in this process
    (each uncompiled and compiled with ``compare_compile``); with Ray: the same plus teacher actors at equal
    total cores (:func:`~kd_cluster.bench.teacher_ray.bench_teacher_ray`)."""
    import os

    if compare_compile and use_ray:
        raise ValueError("--compile measures uncompiled against compiled models in one process: add --no-ray")
    load0 = os.getloadavg()
    extra: dict[str, Any] = {}
    if not use_ray:  # one process: student alone, teacher alone, and both on its one device, round by round
        import dataclasses

        variants = (False, True) if compare_compile else (b.compile,)
        by = {v: {"student step alone": [], "teacher forward alone": [], "colocated": []} for v in variants}
        for _ in range(rounds):
            for v in variants:
                bv = dataclasses.replace(b, compile=v)
                by[v]["student step alone"].append(student_rate(bv))
                by[v]["teacher forward alone"].append(teacher_rate(bv))
                by[v]["colocated"].append(colocated_rate(bv))
        first = by[variants[0]]
        s_rates, t_rates = first["student step alone"], first["teacher forward alone"]
        by_config = {"colocated (1 worker, teacher on its device)": first["colocated"]}
        if compare_compile:
            extra["compile"] = summarize_compile(by[False], by[True])
    else:  # every figure measured on the cluster, round by round
        from kd_cluster.bench.teacher_ray import bench_teacher_ray
        from kd_cluster.cluster.local_ray import ensure_ray

        ensure_ray(address, cores)
        extra = bench_teacher_ray(b, cores=cores, replicas=replicas, prefetches=prefetches, rounds=rounds)
        by_config = extra.pop("rounds")
        s_rates, t_rates = extra.pop("student_rates"), extra.pop("teacher_rates")
    res = summarize(by_config, statistics.median(s_rates), statistics.median(t_rates)) | extra
    res["load"] = f"{'/'.join(f'{x:.1f}' for x in load0)} -> {'/'.join(f'{x:.1f}' for x in os.getloadavg())}"
    return res


__all__ = ["BenchSetup", "format_table", "measure", "setup_for", "summarize", "summarize_compile"]
