"""The training loop of one worker. Runs the same with Ray Train (DDP over gloo/NCCL) and without Ray.

Reads top to bottom: build -> restore -> for each step: batch, forward(s), method loss terms,
backward, step -> log / eval / checkpoint. The only host syncs are at log, eval and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kd_cluster.data import (AugmentParams, EvalStream, TrainStream, close_loader, load_manifest, make_eval_loader,
                             make_train_loader, mixup, mixup_lambda, start_workers)
from kd_cluster.methods import Method, SetupInfo, StepOutputs, build_method, method_needs
from kd_cluster.models import TappedModel, build_model, load_weights, save_weights
from kd_cluster.optim import build_optimizer, build_schedule, milestone_steps, optimizer_step
from kd_cluster.storage import CheckpointStore, Store, storage_options
from kd_cluster.teacher import ColocatedTeacher
from kd_cluster.teacher.remote import LocalPool, RemoteTeacher, build_server, server_config
from kd_cluster.telemetry import Fanout, JsonlSink, NullSink, Progress, Sink, WandbSink, resolve_wandb_mode
from kd_cluster.train.memory import keep_freed_memory
from kd_cluster.train.plan import StagePlan
from kd_cluster.train.session import Session
from kd_cluster.train.checkpoint import (STATE_FILE, RNG_FILE, CheckpointWriter, restore_files, rng_state,
                                        set_rng_state, snapshot)
from kd_cluster.train.preempt import Preempted

VIEWS = {"same": ("aug",), "center": ("aug", "center"), "independent": ("aug", "aug2")}


@dataclass
class StageResult:
    """What a finished (or stopped) stage reports back to the driver."""

    stage: str
    steps: int
    resumed_from: int = 0
    final_metrics: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    wall_s: float = 0.0
    wandb_dir: str | None = None
    wandb_url: str | None = None


class Normalizer(nn.Module):
    """uint8 NCHW on the device -> normalised float; the loader never builds float pixels."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255.0), persistent=False)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) * self.inv_std).contiguous(memory_format=self.fmt)


def default_normalization(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics for RGB, 0.5/0.5 for grayscale."""
    if channels == 3:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [0.5] * channels, [0.5] * channels


def seed_all(seed: int) -> None:
    """Seed torch and Python's RNGs (data randomness has its own generators)."""
    torch.manual_seed(seed)
    random.seed(seed)


def _reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _logits(out: Any) -> torch.Tensor:
    """Logits from a plain model's output or a TappedModel's (logits, features)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate(model: nn.Module | None, teacher: ColocatedTeacher | None, loader: Any, norm: Normalizer,
             device: torch.device, world: int, amp: torch.dtype | None) -> dict[str, float]:
    """Student top-1/top-5, teacher top-1 and student-teacher agreement over the val split (all ranks).

    ``model`` None (a stage that trains only a method's modules): teacher metrics only.
    """
    if model is not None:
        model.eval()
    acc = torch.zeros(5, device=device, dtype=torch.float64)  # top1, top5, teacher top1, agreement, n
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    for batch in loader:
        x = norm(batch["image"].to(device, non_blocking=True))
        y = batch["label"].to(device, non_blocking=True)
        s_pred = None
        if model is not None:
            with ctx:
                logits = _logits(model(x))
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            s_pred = topk[:, 0]
            acc[0] += (s_pred == y).sum()
            acc[1] += (topk == y[:, None]).any(dim=1).sum()
        if teacher is not None:
            t_pred = teacher.logits(x, raw=batch["image"]).argmax(dim=1)
            acc[2] += (t_pred == y).sum()
            if s_pred is not None:
                acc[3] += (t_pred == s_pred).sum()
        acc[4] += y.numel()
    if model is not None:
        model.train()
    top1, top5, t1, agree, n = _reduce_sum(acc, world).tolist()
    n = max(n, 1.0)
    out = {"eval/student_top1": top1 / n, "eval/student_top5": top5 / n} if model is not None else {}
    if teacher is not None:
        out |= {"eval/teacher_top1": t1 / n}
        if model is not None:
            out["eval/agreement"] = agree / n
    return out


def train_step(batch: dict[str, Any], lam: float, *, net: nn.Module | None, teacher: ColocatedTeacher | None,
               method: Method, norm: Normalizer, device: torch.device,
               autocast: contextlib.AbstractContextManager, step: int = 0,
               stats: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Forward passes of one step: the views the method asked for, mixup, expansion, teacher, student,
    loss terms. ``net`` None: the method trains only its own modules (``needs.student`` False).

    ``stats``, when given, receives detached scalars about the step that are not loss terms: with a teacher,
    ``train/teacher_agreement``, the fraction of the training batch on which the student's top class (on its
    input) equals the teacher's (on the teacher's view), i.e. how well the student fits its targets."""
    needs = method.needs
    x = norm(batch["image"].to(device, non_blocking=True))
    x = method.expand(mixup(x, lam) if lam < 1.0 else x)
    t_logits, t_feats = None, {}
    if teacher is not None and "teacher_out" in batch:  # a teacher pool computed them (same views and mixup)
        t_logits, t_feats = teacher.outputs(batch["teacher_out"])
    elif teacher is not None:
        if "image_t" in batch:  # the method asked for another view: center crop (no mixup) or a second crop
            xt = norm(batch["image_t"].to(device, non_blocking=True))
            if needs.teacher_view == "independent" and lam < 1.0:
                xt = mixup(xt, lam)
            xt = method.expand(xt)
        else:  # the very same tensor the student sees
            xt = x
        t_logits, t_feats = teacher(xt)
    s_logits, s_feats = None, {}
    if net is not None:
        with autocast:
            out = net(x)
        s_logits, s_feats = out if isinstance(out, tuple) else (out, {})
        s_logits = s_logits.float()
        s_feats = {k: v.float() for k, v in s_feats.items()}
    if stats is not None and s_logits is not None and t_logits is not None and t_logits.shape[0] == s_logits.shape[0]:
        stats["train/teacher_agreement"] = (s_logits.detach().argmax(1) == t_logits.argmax(1)).float().mean()
    labels = batch["label"].to(device, non_blocking=True)
    index = batch["index"].to(device, non_blocking=True) if needs.index else None
    return method(StepOutputs(student_logits=s_logits, labels=labels, lam=lam, teacher_logits=t_logits,
                              student_features=s_feats, teacher_features=t_feats, index=index, images=x,
                              step=step))


@torch.no_grad()
def probe_outputs(model: nn.Module | None, teacher: ColocatedTeacher | None, method: Method, *, channels: int,
                  image_size: int, device: torch.device) -> StepOutputs:
    """What one step's outputs look like (shapes), from a no-grad forward on a dummy batch of two."""
    x = method.expand(torch.zeros(2, channels, image_size, image_size, device=device))
    t_logits, t_feats = teacher(x) if teacher is not None else (None, {})
    s_logits, s_feats = None, {}
    if model is not None:
        model.eval()
        out = model(x)
        model.train()
        s_logits, s_feats = out if isinstance(out, tuple) else (out, {})
    return StepOutputs(student_logits=s_logits, labels=torch.zeros(2, dtype=torch.long, device=device), lam=1.0,
                       teacher_logits=t_logits, student_features=s_feats, teacher_features=t_feats,
                       index=torch.arange(2, device=device), images=x)


def average_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of parameters DDP does not manage (a method's own modules): one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _sinks(plan: StagePlan, session: Session, start_step: int) -> tuple[Sink, WandbSink | None]:
    if session.rank != 0:
        return NullSink(), None
    spec = plan.spec
    tel = spec.telemetry
    jsonl_dir = Path(tel.wandb_dir).parent / "metrics" / plan.run
    sinks: list[Sink] = [JsonlSink(jsonl_dir / f"{plan.stage}.jsonl", start_step)]
    if tel.progress:
        sinks.append(Progress(plan.stage, plan.total_steps, start_step, bar=session.interactive))
    wb = None
    if resolve_wandb_mode(tel) != "disabled":
        wb = WandbSink(tel, plan.run, spec.model_dump(mode="json"), plan.step_offset)
    return Fanout(sinks, [wb] if wb else [], plan.stage), wb


def run_stage(plan: StagePlan, session: Session, teacher_pool: Any = None) -> StageResult:
    """Train one stage to ``plan.total_steps`` (resuming from the session's latest checkpoint).

    ``teacher_pool``: the teacher servers of ``teacher.placement: actors`` (the driver's Ray actors); None
    with that placement runs one server in this process, behind a thread.
    """
    with contextlib.ExitStack() as cleanup:  # loader processes and teacher threads stop however the stage ends
        return _run_stage(plan, session, teacher_pool, cleanup)


def _run_stage(plan: StagePlan, session: Session, teacher_pool: Any, cleanup: contextlib.ExitStack) -> StageResult:
    spec, rank, world, device = plan.spec, session.rank, session.world_size, session.device
    keep_freed_memory()  # no page-fault storm from glibc trimming activation memory after every step
    t_start = time.perf_counter()
    opts = storage_options(plan.train_manifest, spec.data.endpoint_url)
    train_manifest = load_manifest(plan.train_manifest, opts)
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if (on_gpu and spec.resources.amp) else None
    channels_last = on_gpu and spec.resources.channels_last

    seed_all(spec.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(plan.arch, num_classes=plan.num_classes, in_chans=plan.channels)
    if plan.weights:
        load_weights(model, plan.weights, storage_options=storage_options(plan.weights, spec.storage.endpoint_url))
    method: Method = build_method(spec.method.name, spec.method.params())
    needs = method.needs
    if needs.student_features:
        model = TappedModel(model, needs.student_features)
    teacher = None
    if needs.teacher and plan.teacher_arch and spec.teacher.placement == "actors":
        teacher = _remote_teacher(plan, teacher_pool, device, rank)
        if teacher_pool is None:  # its own in-process server
            cleanup.callback(teacher.close)
    elif needs.teacher and plan.teacher_arch:
        t_model = build_model(plan.teacher_arch, num_classes=plan.num_classes, in_chans=plan.channels)
        load_weights(t_model, plan.teacher_weights,
                     storage_options=storage_options(plan.teacher_weights, spec.storage.endpoint_url))
        teacher = ColocatedTeacher(t_model, device, amp, channels_last, taps=needs.teacher_features)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    student = model if needs.student else None
    probe = probe_outputs(student, teacher, method, channels=plan.channels, image_size=spec.data.image_size,
                          device=device)
    method.setup(probe, SetupInfo(num_classes=plan.num_classes, num_samples=train_manifest.num_samples,
                                  world_size=world, total_steps=plan.total_steps, channels=plan.channels))
    method.to(device)
    if plan.method_init:
        load_weights(method, plan.method_init, allow_missing=True,
                     storage_options=storage_options(plan.method_init, spec.storage.endpoint_url))
    method_params = [p for p in method.parameters() if p.requires_grad]
    trainable = [model, method] if needs.student else [method]
    optimizer = build_optimizer(spec.optimizer, trainable, spec.data.batch_size)
    sched = build_schedule(optimizer, plan.total_steps, spec.schedule.warmup_steps, spec.schedule.decay,
                           milestone_steps(spec.schedule, train_manifest.num_samples, spec.data.batch_size),
                           spec.schedule.gamma)

    ckpts = CheckpointStore(Store(plan.stage_url, spec.storage.endpoint_url))
    seed_all(spec.seed * 1_000_003 + rank)  # per-rank stochasticity (dropout), restored from checkpoints
    start_step, rng = _restore(plan, ckpts, rank, world, model=model, method=method, optimizer=optimizer,
                               scheduler=sched)
    # the tiny per-check all-reduce (preempted? checkpoint due?) runs on the CPU, never syncing the GPU stream
    flag_group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
    writer = CheckpointWriter(ckpts, spec.schedule.keep_checkpoints, spec.fault_tolerance.upload_retry_s) if rank == 0 else None

    net: nn.Module | None = None
    if needs.student:
        net = DDP(model, device_ids=[device.index] if on_gpu else None) if world > 1 else model
    mean, std = (spec.data.normalize.mean, spec.data.normalize.std) if spec.data.normalize else default_normalization(plan.channels)
    norm = Normalizer(mean, std, channels_last).to(device)
    aug = AugmentParams(image_size=spec.data.image_size, crop_scale=tuple(spec.augment.crop_scale),
                        crop_ratio=tuple(spec.augment.crop_ratio), flip=spec.augment.flip,
                        eval_resize_ratio=spec.augment.eval_resize_ratio, channels=plan.channels)
    per_rank = spec.data.batch_size // world
    views = VIEWS[needs.teacher_view] if teacher is not None else ("aug",)
    stream = TrainStream(train_manifest, batch_size=per_rank, seed=spec.seed, rank=rank, world_size=world,
                         num_workers=spec.data.loader_workers, start_step=start_step, augment=aug, views=views,
                         storage_options=opts)
    loader = iter(make_train_loader(stream, num_workers=spec.data.loader_workers, pin_memory=on_gpu))
    cleanup.callback(close_loader, loader)
    val_manifest = load_manifest(plan.val_manifest, opts) if plan.val_manifest else None
    ev_loader = None
    if val_manifest is not None:
        ev = EvalStream(val_manifest, batch_size=spec.data.eval_batch_size or per_rank, rank=rank,
                        world_size=world, augment=aug, storage_options=opts)
        ev_loader = make_eval_loader(ev, num_workers=min(1, spec.data.loader_workers))
        cleanup.callback(close_loader, ev_loader)
        # every loader process is forked here, before teacher requests are in flight: a fork during a Ray call
        # crashed the worker (gRPC's fork handlers) when evaluation started mid-stage with teacher actors
        start_workers(ev_loader)
    if isinstance(teacher, RemoteTeacher):  # requests of the next teacher.prefetch steps stay in flight
        loader = teacher.feed(loader, lambda s: mixup_lambda(spec.seed, s, spec.augment.mixup_alpha))

    def eval_now() -> dict[str, float]:
        if ev_loader is None:
            return {}
        return evaluate(student, teacher, ev_loader, norm, device, world, amp)

    sink, wb = _sinks(plan, session, start_step)
    sched_spec = spec.schedule
    ft = spec.fault_tolerance
    ckpt_every = sched_spec.checkpoint_every or plan.total_steps
    ckpt_seconds = sched_spec.checkpoint_minutes * 60 if sched_spec.checkpoint_minutes else None
    last_ckpt_t = time.monotonic()
    ckpt_metrics: dict[str, float] = {}

    def checkpoint(step_done: int) -> None:
        nonlocal last_ckpt_t, ckpt_metrics
        ckpt_metrics = _checkpoint(plan, writer, world, step_done, model=model, method=method, optimizer=optimizer,
                                   scheduler=sched)
        last_ckpt_t = time.monotonic()
        session.report(step_done, {"step": step_done, **ckpt_metrics})

    eval_every = sched_spec.eval_every or plan.total_steps
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    term_sums: torch.Tensor | None = None
    term_names: list[str] = []
    window_t0, window_steps, data_wait, corrupt = time.perf_counter(), 0, 0.0, 0
    keys_crc = 0  # a fingerprint of the sample keys this rank trained on in each log window
    rate, last_metrics = 0.0, {}
    if net is not None:
        net.train()
    method.train()
    if rng is not None:  # last thing before the first step: building loaders and sinks draws from the RNGs
        set_rng_state(rng)
    loop_t0 = time.perf_counter()
    for step in range(start_step, plan.total_steps):
        t0 = time.perf_counter()
        batch = next(loader)
        data_wait += time.perf_counter() - t0
        assert batch["step"] == step, f"data stream at step {batch['step']}, loop at {step}"
        corrupt += batch["corrupt"]
        keys_crc = zlib.crc32("\n".join(batch["key"]).encode(), keys_crc)
        lam = mixup_lambda(spec.seed, step, spec.augment.mixup_alpha)
        stats: dict[str, torch.Tensor] = {}
        terms = train_step(batch, lam, net=net, teacher=teacher, method=method, norm=norm, device=device,
                           autocast=autocast, step=step, stats=stats)
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_grads(method_params, world)
        if spec.optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           spec.optimizer.grad_clip_norm)
        optimizer_step(optimizer, spec.optimizer.name, spec.seed, step)
        sched.step()

        detached = torch.stack([loss.detach(), *(v.detach() for v in terms.values()), *stats.values()])
        term_sums = detached if term_sums is None else term_sums + detached
        term_names = ["loss", *terms, *stats]
        window_steps += 1
        done = step + 1
        last = done == plan.total_steps
        if done % sched_spec.log_every == 0 or last:
            sums = _reduce_sum(term_sums / (window_steps * world), world).tolist()  # the log-step sync
            elapsed = time.perf_counter() - window_t0
            rate = window_steps * spec.data.batch_size / max(elapsed, 1e-9)
            metrics = dict(zip(term_names, sums, strict=True))
            metrics |= method.metrics() | ckpt_metrics
            if isinstance(teacher, RemoteTeacher):
                metrics |= teacher.metrics()
            ckpt_metrics = {}
            metrics |= {"lr": sched.get_last_lr()[0], "images_per_s": rate,
                        "data_wait_s_per_step": data_wait / window_steps, "corrupt_samples": float(corrupt),
                        "mixup_lambda": lam, "data/keys_crc": float(keys_crc)}
            if done % eval_every == 0 or last:
                metrics |= eval_now()
            sink.log(done, metrics)
            last_metrics = metrics
            term_sums, window_t0, window_steps, data_wait, keys_crc = None, time.perf_counter(), 0, 0.0, 0
        elif done % eval_every == 0:
            ev = eval_now()
            sink.log(done, ev)
            last_metrics |= ev
        if done % ckpt_every == 0 or last:
            checkpoint(done)
        elif done % ft.check_every == 0:
            time_due = ckpt_seconds is not None and rank == 0 and time.monotonic() - last_ckpt_t >= ckpt_seconds
            preempted, time_due = _agree([session.preemption.requested(), time_due], world, flag_group)
            if preempted:
                t_notice = time.monotonic()
                checkpoint(done)
                saved = _wait_saved(writer, world, flag_group, ft.preemption_grace_s - (time.monotonic() - t_notice))
                if saved:
                    session.preemption.saved.set()
                sink.close()
                raise Preempted(plan.stage, done, session.preemption.reason or "preemption on another rank", saved)
            if time_due:
                checkpoint(done)
    if writer is not None:
        final = writer.flush()
        if final is not None and not final.ok:
            raise RuntimeError(f"stage {plan.stage!r}: the final checkpoint (step {final.step}) could not be "
                               f"written: {final.error}")

    steps_run = plan.total_steps - start_step
    avg_rate = steps_run * spec.data.batch_size / max(time.perf_counter() - loop_t0, 1e-9) if steps_run else 0.0
    if not last_metrics:  # resumed after the final checkpoint: nothing ran, but the stage still needs its result
        last_metrics = eval_now()
    result = StageResult(stage=plan.stage, steps=plan.total_steps, resumed_from=start_step, final_metrics=last_metrics, images_per_s=avg_rate,
                         wall_s=time.perf_counter() - t_start, wandb_dir=getattr(wb, "dir", None),
                         wandb_url=getattr(wb, "url", None))
    sink.close()
    if rank == 0:
        _publish(plan, model, method, result)
    if world > 1:
        dist.barrier()
    return result


def _remote_teacher(plan: StagePlan, pool: Any, device: torch.device, rank: int) -> RemoteTeacher:
    """The client of the stage's teacher pool (an in-process one-server pool when none was given)."""
    t = plan.spec.teacher
    if pool is None:
        pool = LocalPool([build_server(server_config(plan), device)])
    return RemoteTeacher(pool, device, prefetch=t.prefetch, max_in_flight=t.max_in_flight,
                         timeout_s=t.request_timeout_s, max_retries=t.max_retries, rank=rank,
                         teacher_view=method_needs(plan.spec.method.name, plan.spec.method.params()).teacher_view)


def _agree(flags: list[bool], world: int, group: Any) -> list[bool]:
    """Whether any rank raised each flag (one all-reduce of a few bytes on the CPU)."""
    if world <= 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def _wait_saved(writer: CheckpointWriter | None, world: int, group: Any, timeout_s: float) -> bool:
    """Rank 0 waits for the upload in flight (within the grace period); every rank learns whether it landed."""
    ok = False
    if writer is not None:
        res = writer.flush(max(0.0, timeout_s))
        ok = res is not None and res.ok
    if world > 1:
        t = torch.tensor([int(ok)], dtype=torch.int32)
        dist.broadcast(t, src=0, group=group)
        ok = bool(t.item())
    return ok


def _restore(plan: StagePlan, ckpts: CheckpointStore, rank: int, world: int, *, model: nn.Module, method: Method,
             optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, dict[str, Any] | None]:
    """Load the latest committed checkpoint (rank 0 reads the pointer, every rank the files).

    Returns its step and this rank's RNG state, which the caller sets right before the first step.
    """
    step = ckpts.latest() if rank == 0 else None
    if world > 1:
        box = [step]
        dist.broadcast_object_list(box, src=0)
        step = box[0]
    if step is None:
        return 0, None
    state, rngs = restore_files(ckpts, step)
    _unwrap(model).load_state_dict(state["model"])
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    meta = state["meta"]
    spec = plan.spec
    if meta.get("loader_workers") != spec.data.loader_workers:
        raise ValueError(f"data.loader_workers changed from {meta.get('loader_workers')} to "
                         f"{spec.data.loader_workers}; the data cursor of run {plan.run!r} depends on it")
    if rank == 0:
        note = "" if meta.get("world_size") == world else (
            f" (it was written by {meta.get('world_size')} workers, now {world}: the data order changes from here)")
        sys.stdout.write(f"[{plan.stage}] resumed from checkpoint at step {step}{note}\n")
    # a run resumed with more workers than it had: new ranks keep their fresh seeds
    return int(state["step"]), (rngs[rank] if rank < len(rngs) else None)


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def _checkpoint(plan: StagePlan, writer: CheckpointWriter | None, world: int, step: int, *, model: nn.Module,
                method: Method, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, float]:
    """Gather every rank's RNG state on rank 0, snapshot the state to host memory, hand it to the writer.

    Collective (every rank calls it at the same step). Returns the checkpoint metrics (rank 0).
    """
    t0 = time.perf_counter()
    rngs: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if writer is None:
        return {}
    spec = plan.spec
    state = snapshot({
        "step": step,
        "model": _unwrap(model).state_dict(),
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "meta": {"run": plan.run, "stage": plan.stage, "loader_workers": spec.data.loader_workers,
                 "world_size": world, "wandb_id": plan.run, "spec": spec.model_dump_json()},
    })
    waited = writer.submit(step, {STATE_FILE: state, RNG_FILE: rngs}, info={"world_size": world})
    out = {"checkpoint/stall_s": time.perf_counter() - t0, "checkpoint/wait_previous_s": waited}
    prev = writer.last
    if prev is not None:
        out |= {"checkpoint/bytes": float(prev.bytes), "checkpoint/upload_s": prev.upload_s,
                "checkpoint/failed_uploads": float(sum(not r.ok for r in writer.results))}
    return out


def _publish(plan: StagePlan, model: nn.Module, method: Method, result: StageResult) -> None:
    """Write the stage's artifacts (model weights; the method's modules when it has any), then its
    completion marker, which makes the stage final."""
    opts = storage_options(plan.artifact_url, plan.spec.storage.endpoint_url)
    save_weights(model, plan.artifact_url, storage_options=opts)
    if method.state_dict():
        save_weights(method, plan.method_artifact_url, storage_options=opts)
    Store(plan.stage_url, plan.spec.storage.endpoint_url).write_json(
        "stage.json", {**asdict(result), "arch": plan.arch, "artifact": plan.artifact_url})


def stage_done(plan: StagePlan) -> dict[str, Any] | None:
    """The completion marker of a finished stage, or None."""
    store = Store(plan.stage_url, plan.spec.storage.endpoint_url)
    return store.read_json("stage.json") if store.exists("stage.json") else None


__all__ = ["StageResult", "default_normalization", "evaluate", "run_stage", "stage_done"]
