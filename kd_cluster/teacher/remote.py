"""Teacher inference apart from the training worker, without Ray.

- :class:`TeacherRequest` is what a training worker sends for one batch: the uint8 crops and the mixup
  parameters (``lam``; the partner of sample ``i`` is sample ``i - 1``, a roll by one), never float pixels.
- :class:`TeacherServer` runs the frozen teacher on a request: the same normalisation, mixup and method
  expansion the colocated path applies, then returns exactly the outputs the method asked for (logits and
  the tapped features), in bfloat16 on a GPU and float32 on the CPU.
- :class:`RemoteTeacher` is the worker's client over any *pool* (``size``, ``submit(replica, request) ->
  concurrent.futures.Future``): it keeps the requests of the next ``prefetch`` steps in flight while the
  current step trains, spreads them over the replicas, bounds what is in flight, and retries a request whose
  replica failed on another one. :class:`LocalPool` is an in-process pool (one thread per server).

This is placement ``actors`` (:func:`build_actors`): the pool is the driver's Ray actors
(``kd_cluster.cluster.teacher_pool``, one actor per replica), or without a driver pool one server in the
training process behind a thread.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from kd_cluster.data import mixup
from kd_cluster.models import Normalizer
from kd_cluster.teacher.base import (Batch, MemberPlan, StepInput, Teacher, TeacherContext, TeacherEval,
                                     TeacherOutputs, TeacherPlan)
from kd_cluster.teacher.colocated import ColocatedTeacher

REQUEST_OVERHEAD_BYTES = 64  # the scalars of a request/reply (lam, step, flags, ids), a generous bound


class TeacherUnavailable(RuntimeError):
    """A request could not be answered by any replica within its retries."""


@dataclass
class TeacherRequest:
    """One batch for the teacher, compact: uint8 NCHW crops plus the mixup weight."""

    image: torch.Tensor
    lam: float = 1.0
    expand: bool = True  # apply the method's expansion (False: evaluation and the shape probe)
    step: int = -1

    def nbytes(self) -> int:
        return self.image.numel() * self.image.element_size() + REQUEST_OVERHEAD_BYTES


@dataclass
class TeacherReply:
    """The teacher's outputs for one request (on the CPU) and who computed them."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    server_id: str
    compute_s: float

    def nbytes(self) -> int:
        ts = [self.logits, *self.features.values()]
        return sum(t.numel() * t.element_size() for t in ts) + REQUEST_OVERHEAD_BYTES


class TeacherServer:
    """Runs the frozen teacher on :class:`TeacherRequest` s (one at a time)."""

    def __init__(self, teacher: ColocatedTeacher, norm: nn.Module, expand: Callable[[torch.Tensor], torch.Tensor] | None,
                 out_dtype: torch.dtype | None = None) -> None:
        self.teacher = teacher
        self.norm = norm.to(teacher.device)
        self.expand = expand
        self.out_dtype = out_dtype or (torch.bfloat16 if teacher.device.type == "cuda" else torch.float32)
        self.server_id = uuid.uuid4().hex  # a new one after every restart

    @torch.no_grad()
    def infer(self, req: TeacherRequest) -> TeacherReply:
        t0 = time.perf_counter()
        x = self.norm(req.image.to(self.teacher.device, non_blocking=True))
        if req.lam < 1.0:
            x = mixup(x, req.lam)
        if req.expand and self.expand is not None:
            x = self.expand(x)
        logits, feats = self.teacher(x)
        out = TeacherReply(logits=logits.to("cpu", self.out_dtype),
                           features={k: v.to("cpu", self.out_dtype) for k, v in feats.items()},
                           server_id=self.server_id, compute_s=0.0)
        out.compute_s = time.perf_counter() - t0
        return out


@dataclass
class ServerConfig:
    """Everything a teacher server needs to build itself (picklable: it is sent to the actors)."""

    arch: str
    num_classes: int
    channels: int
    weights: str | None
    endpoint_url: str | None
    taps: tuple[str, ...]
    mean: list[float]
    std: list[float]
    method_name: str
    method_params: dict[str, Any] = field(default_factory=dict)
    amp: bool = True
    channels_last: bool = True
    compile: bool = False


def server_config(plan: TeacherPlan, member: MemberPlan) -> ServerConfig:
    """The server config of one member of a stage's teacher."""
    return ServerConfig(arch=member.arch, num_classes=plan.num_classes, channels=plan.channels,
                        weights=member.weights, endpoint_url=plan.endpoint_url, taps=member.taps,
                        mean=list(plan.mean), std=list(plan.std), method_name=plan.method_name,
                        method_params=dict(plan.method_params), amp=plan.amp, channels_last=plan.channels_last,
                        compile=plan.compile)


def build_server(cfg: ServerConfig, device: torch.device | None = None, model: nn.Module | None = None) -> TeacherServer:
    """Load the frozen teacher once (from ``cfg.weights``, or use ``model``) and wrap it in a server."""
    from kd_cluster.methods import Method, build_method
    from kd_cluster.models import build_model, load_weights
    from kd_cluster.storage import storage_options

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if model is None:
        model = build_model(cfg.arch, num_classes=cfg.num_classes, in_chans=cfg.channels)
        if cfg.weights:
            load_weights(model, cfg.weights, storage_options=storage_options(cfg.weights, cfg.endpoint_url))
    amp = torch.bfloat16 if (on_gpu and cfg.amp) else None
    channels_last = on_gpu and cfg.channels_last
    teacher = ColocatedTeacher(model, device, amp, channels_last, taps=cfg.taps, compile=cfg.compile)
    method = build_method(cfg.method_name, cfg.method_params)
    expand = method.expand if type(method).expand is not Method.expand else None
    return TeacherServer(teacher, Normalizer(cfg.mean, cfg.std, channels_last), expand)


class TeacherPool(Protocol):
    """What :class:`RemoteTeacher` needs from a pool of teacher servers."""

    size: int

    def submit(self, replica: int, req: TeacherRequest) -> Future: ...

    def close(self) -> None: ...


class LocalPool:
    """Teacher servers in this process, each behind its own thread (requests to one server run in order)."""

    def __init__(self, servers: list[TeacherServer]) -> None:
        self.servers = servers
        self.size = len(servers)
        self._ex = [ThreadPoolExecutor(1, thread_name_prefix=f"teacher-{i}") for i in range(self.size)]

    def submit(self, replica: int, req: TeacherRequest) -> Future:
        return self._ex[replica].submit(self.servers[replica].infer, req)

    def close(self) -> None:
        for ex in self._ex:
            ex.shutdown(wait=True, cancel_futures=True)


class _Pending:
    """A request in flight; ``result()`` waits for it (retrying on another replica if its replica failed)."""

    def __init__(self, client: RemoteTeacher, req: TeacherRequest) -> None:
        self.client, self.req = client, req
        self.tries = 0
        self._submit(client._pick())

    def _submit(self, replica: int) -> None:
        self.replica = replica
        self.t_submit = time.perf_counter()
        done_at: list[float] = []
        self._done_at = done_at
        self.client._outstanding[replica] += 1
        self.fut: Future | None = self.client.pool.submit(replica, self.req)
        # the callback must not reference self: future -> callback -> self -> future would be a reference cycle,
        # and every reply (teacher features: megabytes) would wait for the cyclic garbage collector
        self.fut.add_done_callback(lambda _f: done_at.append(time.perf_counter()))

    @property
    def t_done(self) -> float | None:
        return self._done_at[0] if self._done_at else None

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.client
        if self.fut is None:
            raise RuntimeError(f"the teacher outputs of step {self.req.step} were already taken (each once)")
        while True:
            try:
                reply: TeacherReply = self.fut.result(timeout=c.timeout_s)
                break
            except Exception as exc:  # noqa: BLE001 - a dead or hung replica: retry elsewhere
                c._outstanding[self.replica] -= 1
                self.tries += 1
                c.retries += 1
                if self.tries > c.max_retries:
                    raise TeacherUnavailable(
                        f"teacher request for step {self.req.step} failed {self.tries} times "
                        f"(last on replica {self.replica}: {type(exc).__name__}: {str(exc).strip()[:300]})") from exc
                self.fut.cancel()
                time.sleep(min(0.05 * 2 ** (self.tries - 1), 2.0))
                self._submit(c._pick(avoid=self.replica))
        c._outstanding[self.replica] -= 1
        c._record(self, reply)
        self.fut = None  # the reply is freed as soon as the caller drops the tensors
        dev = c.device
        return (reply.logits.to(dev, non_blocking=True).float(),
                {k: v.to(dev, non_blocking=True).float() for k, v in reply.features.items()})


class RemoteTeacher(Teacher):
    """A training worker's teacher over a pool: pipelined requests, back-pressure, retries, metrics.

    For training, :meth:`feed` wraps the batch iterator and attaches each batch's pending outputs under
    ``key``; :meth:`step` waits for them. The probe and evaluation send one request each and wait.
    ``keep_view``: leave the batch's second view in the batch (an ensemble's other members still need it).
    """

    reads_views = False

    def __init__(self, pool: TeacherPool, device: torch.device, *, prefetch: int = 1, max_in_flight: int = 4,
                 timeout_s: float = 120.0, max_retries: int = 5, rank: int = 0, teacher_view: str = "same",
                 key: str = "teacher_out", keep_view: bool = False) -> None:
        self.pool, self.device = pool, device
        self.depth = min(prefetch, max_in_flight - 1) + 1  # the current step plus the ones ahead
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.teacher_view = teacher_view
        self.key, self.keep_view = key, keep_view
        self._outstanding = [0] * pool.size
        self._rr = rank % max(pool.size, 1)  # workers start on different replicas
        self._lock = threading.Lock()
        self.retries = 0
        self.restarts = 0
        self._server_ids: list[str | None] = [None] * pool.size
        self._reset_window()

    def _reset_window(self) -> None:
        self._lat: list[float] = []
        self._compute: list[float] = []
        self._depths: list[int] = []
        self._up = self._down = self._images = 0
        self._wait = 0.0
        self._steps = 0

    def _pick(self, avoid: int | None = None) -> int:
        """The replica with the fewest outstanding requests (round robin among equals; not ``avoid`` if possible)."""
        n = self.pool.size
        order = [(self._rr + i) % n for i in range(n)]
        self._rr = (self._rr + 1) % n
        cands = [r for r in order if r != avoid] or order
        return min(cands, key=lambda r: self._outstanding[r])

    def _record(self, p: _Pending, reply: TeacherReply) -> None:
        t_done = p.t_done if p.t_done is not None else time.perf_counter()
        self._lat.append(t_done - p.t_submit)
        self._compute.append(reply.compute_s)
        self._up += p.req.nbytes()
        self._down += reply.nbytes()
        self._images += int(p.req.image.shape[0])
        prev = self._server_ids[p.replica]
        if prev is not None and prev != reply.server_id:
            self.restarts += 1
        self._server_ids[p.replica] = reply.server_id

    def request(self, req: TeacherRequest) -> _Pending:
        self._depths.append(sum(self._outstanding) + 1)
        return _Pending(self, req)

    def feed(self, batches: Iterator[Batch], lam_of_step: Callable[[int], float]) -> Iterator[Batch]:
        """Yield the batches in order, each with ``batch[key]`` (pending outputs); the requests of
        the next ``depth - 1`` batches are already in flight when a batch is yielded."""
        return prefetched(batches, self.depth, lambda b: self.attach(b, lam_of_step(int(b["step"]))))

    def attach(self, b: Batch, lam: float) -> None:
        """Send the request of batch ``b`` and attach its pending outputs under ``key``."""
        if "image_t" in b:  # another view: mixed only when the method asked for an independent one
            img = b["image_t"] if self.keep_view else b.pop("image_t")
            mix = self.teacher_view == "independent"
        else:
            img, mix = b["image"], True
        # crops decoded on the training GPU (data.decode: gpu) travel from host memory, like the loader's
        b[self.key] = self.request(TeacherRequest(img.cpu(), lam if mix else 1.0, True, int(b["step"])))

    def outputs(self, pending: _Pending) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Wait for a batch's outputs (time spent waiting is the ``teacher/wait_s_per_step`` metric)."""
        t0 = time.perf_counter()
        out = pending.result()
        self._wait += time.perf_counter() - t0
        self._steps += 1
        return out

    def step(self, inp: StepInput) -> TeacherOutputs:
        return self.outputs(inp.batch[self.key])

    @torch.no_grad()
    def probe(self, x: torch.Tensor) -> TeacherOutputs:
        """Outputs for a batch of this shape (the setup probe: shapes only; the content is zeros)."""
        img = torch.zeros(x.shape, dtype=torch.uint8)
        return self.request(TeacherRequest(img, 1.0, False)).result()

    __call__ = probe

    def evaluate(self, x: torch.Tensor, raw: torch.Tensor) -> TeacherEval:
        """Logits of the uint8 batch ``raw`` (no mixup, no expansion; float pixels are never sent)."""
        return TeacherEval(self.request(TeacherRequest(raw.cpu(), 1.0, False)).result()[0])

    def metrics(self) -> dict[str, float]:
        """This window's teacher metrics (and the run's restarts and retries so far); resets the window."""
        out = {"teacher/restarts": float(self.restarts), "teacher/retries": float(self.retries)}
        if self._lat:
            lat = sorted(self._lat)
            comp = sorted(self._compute)
            out |= {"teacher/latency_p50_s": _pct(lat, 50), "teacher/latency_p95_s": _pct(lat, 95),
                    "teacher/compute_p50_s": _pct(comp, 50),
                    "teacher/up_bytes_per_image": self._up / max(self._images, 1),
                    "teacher/down_bytes_per_image": self._down / max(self._images, 1)}
        if self._depths:
            out |= {"teacher/queue_depth": sum(self._depths) / len(self._depths),
                    "teacher/queue_depth_max": float(max(self._depths))}
        if self._steps:
            out["teacher/wait_s_per_step"] = self._wait / self._steps
        self._reset_window()
        return out

    def close(self) -> None:
        self.pool.close()


def prefetched(batches: Iterator[Batch], depth: int, attach: Callable[[Batch], None]) -> Iterator[Batch]:
    """Yield ``batches`` in order after ``attach`` ran on each, ``depth - 1`` batches ahead of the one yielded."""
    queue: deque[Batch] = deque()
    exhausted = False
    while True:
        while not exhausted and len(queue) < depth:
            try:
                b = next(batches)
            except StopIteration:
                exhausted = True
                break
            attach(b)
            queue.append(b)
        if not queue:
            return
        yield queue.popleft()


def build_actors(plan: TeacherPlan, ctx: TeacherContext, member: MemberPlan) -> Teacher:
    """The builder of ``placement: actors``: a client of the member's pool (the driver's teacher actors), or of
    one server in this process when no pool was started (``--no-ray``)."""
    pool = (ctx.pools or {}).get(member.name)
    if pool is None:
        pool = LocalPool([build_server(server_config(plan, member), ctx.device)])
    return RemoteTeacher(pool, ctx.device, prefetch=plan.prefetch, max_in_flight=plan.max_in_flight,
                         timeout_s=plan.request_timeout_s, max_retries=plan.max_retries, rank=ctx.rank,
                         teacher_view=plan.view, key=f"teacher_out/{member.name}" if plan.is_ensemble else "teacher_out",
                         keep_view=plan.is_ensemble)


def _pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return float(sorted_vals[k])


__all__ = ["LocalPool", "RemoteTeacher", "ServerConfig", "TeacherPool", "TeacherReply", "TeacherRequest",
           "TeacherServer", "TeacherUnavailable", "build_actors", "build_server", "prefetched", "server_config"]
