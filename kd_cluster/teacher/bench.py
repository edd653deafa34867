"""``kd-cluster bench teacher``: how fast the student steps, how fast the teacher answers, and what a
training worker reaches with the teacher colocated or on teacher actors (Ray-free parts here).

Synthetic uint8 batches of the job's size; random-init models of the job's architectures (weights do not
change the speed). A "worker" here is one process pinned to ``threads`` torch threads: colocated, it runs
teacher forward + student step per batch; with actors, it runs the student step while a
:class:`~kd_cluster.teacher.remote.RemoteTeacher` keeps the next requests in flight. Several workers form a
gloo process group and train as DDP does in a run (gradients all-reduced every step, so they step in
lockstep); every worker starts its timed window at the same barrier and ends it at another, so the summed
rate is a rate over one shared window.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kd_cluster.data import mixup
from kd_cluster.teacher import ColocatedTeacher
from kd_cluster.teacher.remote import RemoteTeacher, ServerConfig, TeacherPool, build_server


@dataclass
class BenchSetup:
    """The models and batch of one benchmark (picklable: sent to Ray tasks)."""

    student: str
    teacher: str
    batch: int
    image_size: int
    channels: int
    num_classes: int
    steps: int
    warmup: int = 10  # untimed steps: the pipeline fills, the allocator and the caches settle
    threads: int = 1
    amp: bool = True  # on a GPU, as the job's resources say: bf16 autocast, channels-last memory
    channels_last: bool = True
    compile: bool = False  # torch.compile student and teacher (compilation happens in the untimed warm-up steps)

    def server_config(self) -> ServerConfig:
        mean, std = [0.5] * self.channels, [0.25] * self.channels
        return ServerConfig(arch=self.teacher, num_classes=self.num_classes, channels=self.channels, weights=None,
                            endpoint_url=None, taps=(), mean=mean, std=std, method_name="funmatch", amp=self.amp,
                            channels_last=self.channels_last, compile=self.compile)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(b: BenchSetup, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (b.batch, b.channels, b.image_size, b.image_size), generator=g, dtype=torch.uint8)
            for _ in range(n)]


class _Student:
    """Student step of the bench: normalise, mixup, forward, KL to the teacher (or CE), backward, AdamW."""

    def __init__(self, b: BenchSetup, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from kd_cluster.models import build_model, maybe_compile
        from kd_cluster.models import Normalizer

        on_gpu = device.type == "cuda"
        channels_last = on_gpu and b.channels_last
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.model = build_model(b.student, num_classes=b.num_classes, in_chans=b.channels).to(device, memory_format=fmt)
        if _world() > 1:  # as in a run: the student's gradients are all-reduced every step
            self.model = DDP(self.model, device_ids=[device.index] if on_gpu else None)
        self.fwd = maybe_compile(self.model, b.compile, "student")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.norm = Normalizer([0.5] * b.channels, [0.25] * b.channels, channels_last).to(device)
        self.ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu and b.amp else contextlib.nullcontext
        self.device = device

    def inputs(self, img: torch.Tensor) -> torch.Tensor:
        return mixup(self.norm(img.to(self.device, non_blocking=True)), 0.7)

    def step(self, x: torch.Tensor, t_logits: torch.Tensor | None) -> None:
        with self.ctx():
            s = self.fwd(x).float()
        loss = (F.kl_div(F.log_softmax(s, 1), F.log_softmax(t_logits, 1), reduction="batchmean", log_target=True)
                if t_logits is not None else s.logsumexp(1).mean())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _as_worker(b: BenchSetup) -> None:
    """This process as a training worker or teacher actor runs: ``b.threads`` torch threads, freed activation
    memory kept (:func:`~kd_cluster.models.keep_freed_memory`), with Ray or without."""
    from kd_cluster.models import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(b.threads)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sync(device: torch.device) -> None:
    """Wait for the device, then for every worker of the group (the shared start and end of a window)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    if _world() > 1:
        dist.barrier()


@contextlib.contextmanager
def worker_group(world: int, rank: int, init_method: str | None) -> Any:
    """A gloo process group of the ``world`` bench workers (none for one worker)."""
    if world <= 1:
        yield
        return
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _timed(b: BenchSetup, device: torch.device, fn: Any) -> float:
    """Images/s of ``fn(i)`` over ``b.steps`` calls after ``b.warmup`` untimed ones."""
    for i in range(b.warmup):
        fn(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(b.steps):
        fn(i)
    _sync(device)
    return b.steps * b.batch / (time.perf_counter() - t0)


def student_rate(b: BenchSetup) -> float:
    """Student steps alone (no teacher), images/s."""
    _as_worker(b)
    dev = _device()
    st, xs = _Student(b, dev), _batches(b)
    return _timed(b, dev, lambda i: st.step(st.inputs(xs[i % len(xs)]), None))


def teacher_rate(b: BenchSetup) -> float:
    """Teacher forwards alone, images/s (the rate of one teacher replica)."""
    _as_worker(b)
    dev = _device()
    server, xs = build_server(b.server_config(), dev), _batches(b)
    norm = server.norm
    return _timed(b, dev, lambda i: server.teacher(mixup(norm(xs[i % len(xs)].to(dev)), 0.7)))


def colocated_rate(b: BenchSetup) -> float:
    """One worker with the teacher on its own device, images/s."""
    _as_worker(b)
    dev = _device()
    st, xs = _Student(b, dev), _batches(b)
    teacher: ColocatedTeacher = build_server(b.server_config(), dev).teacher

    def one(i: int) -> None:
        x = st.inputs(xs[i % len(xs)])
        st.step(x, teacher(x)[0])

    return _timed(b, dev, one)


def actors_rate(b: BenchSetup, pool: TeacherPool, prefetch: int, rank: int = 0) -> dict[str, float]:
    """One worker whose teacher outputs come from ``pool`` with ``prefetch`` steps in flight."""
    _as_worker(b)
    dev = _device()
    st, xs = _Student(b, dev), _batches(b)
    rt = RemoteTeacher(pool, dev, prefetch=prefetch, max_in_flight=max(4, prefetch + 1), rank=rank)
    total = b.warmup + b.steps
    stream = ({"image": xs[s % len(xs)], "step": s} for s in range(total))
    t0 = 0.0
    for b_ in rt.feed(stream, lambda s: 0.7):
        if b_["step"] == b.warmup:
            _sync(dev)
            rt.metrics()
            t0 = time.perf_counter()
        t_logits, _ = rt.outputs(b_["teacher_out"])
        st.step(st.inputs(b_["image"]), t_logits)
    _sync(dev)
    rate = b.steps * b.batch / (time.perf_counter() - t0)
    return {"images_per_s": rate, **rt.metrics()}


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


__all__ = ["BenchSetup", "actors_rate", "colocated_rate", "format_table", "student_rate", "summarize",
           "summarize_compile", "teacher_rate"]
