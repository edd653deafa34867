"""The rates ``kd-cluster bench teacher`` measures (:mod:`kd_cluster.bench.teacher` runs them, in this process
or as Ray tasks of :mod:`kd_cluster.bench.teacher_ray`): how fast the student steps, how fast the teacher
answers, and what a training worker reaches with the teacher colocated or on teacher actors.

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

        from kd_cluster.models import Normalizer, build_model, maybe_compile

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


__all__ = ["BenchSetup", "actors_rate", "colocated_rate", "student_rate", "teacher_rate", "worker_group"]
