"""The training loop of one worker. Runs the same with Ray Train (DDP over gloo/NCCL) and without Ray.

A stage is built once (:class:`StageRunner`: models, method, teacher, optimizer, data, components), then
:meth:`StageRunner.run` reads top to bottom: batch, forward passes, method loss terms, backward, step; then
each component (logger, evaluator, checkpointer, preemption check; :mod:`kd_cluster.train.components`)
acts when its own timing says so. The only host syncs are at log, eval and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kd_cluster.data import (AugmentParams, DataError, EvalStream, TrainStream, close_loader, load_manifest,
                             make_eval_loader, make_train_loader, mixup, mixup_lambda, start_workers)
from kd_cluster.data.gpu_decode import GpuDecoder, NvImageCodecDecoder
from kd_cluster.methods import Method, SetupInfo, StepOutputs, build_method
from kd_cluster.models import (Normalizer, TappedModel, build_model, default_normalization, keep_freed_memory,
                               load_weights, maybe_compile, save_weights)
from kd_cluster.optim import build_optimizer, build_schedule, milestone_steps, optimizer_step
from kd_cluster.storage import CheckpointStore, Store, storage_options
from kd_cluster.teacher import StepInput, Teacher, TeacherContext, TeacherView, build_teacher
from kd_cluster.telemetry import Fanout, JsonlSink, NullSink, Progress, Sink, WandbSink, resolve_wandb_mode
from kd_cluster.train.checkpoint import CheckpointWriter, set_rng_state
from kd_cluster.train.components import (Checkpointer, DataFeed, Evaluator, MetricLogger, PreemptionCheck,
                                         TrainState, reduce_sum)
from kd_cluster.train.plan import StagePlan
from kd_cluster.train.preempt import Preempted
from kd_cluster.train.session import Session

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


def seed_all(seed: int) -> None:
    """Seed torch and Python's RNGs (data randomness has its own generators)."""
    torch.manual_seed(seed)
    random.seed(seed)


def _logits(out: Any) -> torch.Tensor:
    """Logits from a plain model's output or a TappedModel's (logits, features)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate(model: nn.Module | None, teacher: Teacher | None, loader: Any, norm: Normalizer,
             device: torch.device, world: int, amp: torch.dtype | None) -> dict[str, float]:
    """Student top-1/top-5, teacher top-1 and student-teacher agreement over the val split (all ranks); for an
    ensemble teacher also each member's top-1.

    ``model`` None (a stage that trains only a method's modules): teacher metrics only.
    """
    if model is not None:
        model.eval()
    if teacher is not None and not teacher.evaluates:  # e.g. stored labels: no teacher for val images
        teacher = None
    members = teacher.member_names if teacher is not None else ()
    # top1, top5, teacher top1, agreement, n, then each member's top-1
    acc = torch.zeros(5 + len(members), device=device, dtype=torch.float64)
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
            out = teacher.evaluate(x, batch["image"])
            t_pred = out.logits.argmax(dim=1)
            acc[2] += (t_pred == y).sum()
            if s_pred is not None:
                acc[3] += (t_pred == s_pred).sum()
            for j, name in enumerate(members):
                acc[5 + j] += (out.members[name].argmax(dim=1) == y).sum()
        acc[4] += y.numel()
    if model is not None:
        model.train()
    top1, top5, t1, agree, n, *each = reduce_sum(acc, world).tolist()
    n = max(n, 1.0)
    res = {"eval/student_top1": top1 / n, "eval/student_top5": top5 / n} if model is not None else {}
    if teacher is not None:
        res |= {"eval/teacher_top1": t1 / n}
        res |= {f"eval/teacher/{name}_top1": v / n for name, v in zip(members, each, strict=True)}
        if model is not None:
            res["eval/agreement"] = agree / n
    return res


def train_step(batch: dict[str, Any], lam: float, *, net: nn.Module | None, teacher: Teacher | None,
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
    if teacher is not None:
        view = TeacherView(needs.teacher_view, method.expand, norm)
        t_logits, t_feats = teacher.step(StepInput(batch, x, lam, view, device))
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
def probe_outputs(model: nn.Module | None, teacher: Teacher | None, method: Method, *, channels: int,
                  image_size: int, device: torch.device) -> StepOutputs:
    """What one step's outputs look like (shapes), from a no-grad forward on a dummy batch of two."""
    x = method.expand(torch.zeros(2, channels, image_size, image_size, device=device))
    t_logits, t_feats = teacher.probe(x) if teacher is not None else (None, {})
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


def run_stage(plan: StagePlan, session: Session, teacher_pools: dict[str, Any] | None = None) -> StageResult:
    """Train one stage to ``plan.total_steps`` (resuming from the session's latest checkpoint).

    ``teacher_pools``: per teacher member, the servers a driver started for this stage (Ray teacher actors);
    None lets the placement provide its own (an in-process server for ``actors``).
    """
    with contextlib.ExitStack() as cleanup:  # loader processes and teacher threads stop however the stage ends
        return StageRunner(plan, session, teacher_pools, cleanup).run()


class StageRunner:
    """One stage on one worker: everything built in ``__init__`` (in an order that fixes every random draw),
    then :meth:`run`."""

    def __init__(self, plan: StagePlan, session: Session, teacher_pools: dict[str, Any] | None,
                 cleanup: contextlib.ExitStack) -> None:
        keep_freed_memory()  # no page-fault storm from glibc trimming activation memory after every step
        self.t_start = time.perf_counter()
        self.plan, self.session, self.cleanup = plan, session, cleanup
        self.spec, self.rank, self.world, self.device = plan.spec, session.rank, session.world_size, session.device
        on_gpu = self.device.type == "cuda"
        self.amp = torch.bfloat16 if (on_gpu and self.spec.resources.amp) else None
        self.channels_last = on_gpu and self.spec.resources.channels_last
        self.opts = storage_options(plan.train_manifest, self.spec.data.endpoint_url)
        self.train_manifest = load_manifest(plan.train_manifest, self.opts)
        self._build_models(teacher_pools)
        self._build_optimization()
        self._build_checkpointer()
        self._build_data()
        self._build_components()

    def _build_models(self, teacher_pools: dict[str, Any] | None) -> None:
        """Student (identical init on every rank), method, teacher; the method sized from a probe forward."""
        plan, spec, device = self.plan, self.spec, self.device
        seed_all(spec.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
        model = build_model(plan.arch, num_classes=plan.num_classes, in_chans=plan.channels)
        if plan.weights:
            load_weights(model, plan.weights, storage_options=storage_options(plan.weights, spec.storage.endpoint_url))
        self.method: Method = build_method(spec.method.name, spec.method.params())
        needs = plan.needs
        if needs.student_features:
            model = TappedModel(model, needs.student_features)
        self.teacher: Teacher | None = None
        if plan.teacher is not None:
            ctx = TeacherContext(device=device, rank=self.rank, amp=self.amp, channels_last=self.channels_last,
                                 expand=self.method.expand, pools=teacher_pools)
            # the teacher's random init (then overwritten by its weights) must not shift what the student side
            # draws next (a method's modules): otherwise their init would depend on where the teacher runs
            with torch.random.fork_rng(devices=[]):
                self.teacher = build_teacher(plan.teacher, ctx)
            self.cleanup.callback(self.teacher.close)
        model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.model = model
        self.student = model if needs.student else None
        probe = probe_outputs(self.student, self.teacher, self.method, channels=plan.channels,
                              image_size=spec.data.image_size, device=device)
        self.method.setup(probe, SetupInfo(num_classes=plan.num_classes, num_samples=self.train_manifest.num_samples,
                                           world_size=self.world, total_steps=plan.total_steps,
                                           channels=plan.channels))
        self.method.to(device)
        if plan.method_init:
            load_weights(self.method, plan.method_init, allow_missing=True,
                         storage_options=storage_options(plan.method_init, spec.storage.endpoint_url))

    def _build_optimization(self) -> None:
        spec = self.spec
        self.method_params = [p for p in self.method.parameters() if p.requires_grad]
        trainable = [self.model, self.method] if self.plan.needs.student else [self.method]
        self.optimizer = build_optimizer(spec.optimizer, trainable, spec.data.batch_size)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.sched = build_schedule(self.optimizer, self.plan.total_steps, spec.schedule.warmup_steps,
                                    spec.schedule.decay, milestone_steps(spec.schedule, self.train_manifest.num_samples,
                                                                         spec.data.batch_size), spec.schedule.gamma)

    def _build_checkpointer(self) -> None:
        """Restore the latest checkpoint; the per-rank seeds first, so that a fresh run draws from them."""
        plan, spec, world = self.plan, self.spec, self.world
        ckpts = CheckpointStore(Store(plan.stage_url, spec.storage.endpoint_url))
        seed_all(spec.seed * 1_000_003 + self.rank)  # per-rank stochasticity (dropout), restored from checkpoints
        meta = {"run": plan.run, "stage": plan.stage, "loader_workers": spec.data.loader_workers, "world_size": world,
                "wandb_id": plan.run, "spec": spec.model_dump_json()}
        writer = (CheckpointWriter(ckpts, spec.schedule.keep_checkpoints, spec.fault_tolerance.upload_retry_s)
                  if self.rank == 0 else None)
        sched = spec.schedule
        self.checkpointer = Checkpointer(
            ckpts, TrainState(self.model, self.method, self.optimizer, self.sched, meta), rank=self.rank, world=world,
            every=sched.checkpoint_every or plan.total_steps, total=plan.total_steps,
            seconds=sched.checkpoint_minutes * 60 if sched.checkpoint_minutes else None, writer=writer,
            report=self.session.report)
        self.start_step, self.rng = self.checkpointer.restore(plan.stage, spec.data.loader_workers, plan.run)
        # the tiny per-check all-reduce (preempted? checkpoint due?) runs on the CPU, never syncing the GPU stream
        self.flag_group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
        self.net: nn.Module | None = None
        if self.plan.needs.student:
            on_gpu = self.device.type == "cuda"
            # the training forward may be compiled; checkpoints, evaluation and the published weights use self.model
            fwd = maybe_compile(self.model, self.spec.resources.compile, "student")
            self.net = DDP(fwd, device_ids=[self.device.index] if on_gpu else None) if world > 1 else fwd

    def _build_data(self) -> None:
        """Normalisation, the train stream from the restored step, the persistent eval loader; every loader
        process is forked here, before teacher requests are in flight (a fork during a Ray call crashed the
        worker: gRPC's fork handlers)."""
        plan, spec, rank, world = self.plan, self.spec, self.rank, self.world
        mean, std = (spec.data.normalize.mean, spec.data.normalize.std) if spec.data.normalize \
            else default_normalization(plan.channels)
        self.norm = Normalizer(mean, std, self.channels_last).to(self.device)
        aug = AugmentParams(image_size=spec.data.image_size, crop_scale=tuple(spec.augment.crop_scale),
                            crop_ratio=tuple(spec.augment.crop_ratio), flip=spec.augment.flip,
                            eval_resize_ratio=spec.augment.eval_resize_ratio, channels=plan.channels)
        per_rank = spec.data.batch_size // world
        views = self.teacher.train_views(plan.needs.teacher_view) if self.teacher is not None else ("aug",)
        decoder = self._gpu_decoder(aug) if spec.data.decode == "gpu" else None
        stream = TrainStream(self.train_manifest, batch_size=per_rank, seed=spec.seed, rank=rank, world_size=world,
                             num_workers=spec.data.loader_workers, start_step=self.start_step, augment=aug,
                             views=views, storage_options=self.opts,
                             stored=self.teacher.view_source if self.teacher is not None else None,
                             decode=spec.data.decode)
        loader = iter(make_train_loader(stream, num_workers=spec.data.loader_workers,
                                        pin_memory=self.device.type == "cuda"))
        self.cleanup.callback(close_loader, loader)
        self.ev_loader = None
        if plan.val_manifest:
            ev = EvalStream(load_manifest(plan.val_manifest, self.opts),
                            batch_size=spec.data.eval_batch_size or per_rank, rank=rank, world_size=world, augment=aug,
                            storage_options=self.opts)
            self.ev_loader = make_eval_loader(ev, num_workers=min(1, spec.data.loader_workers))
            self.cleanup.callback(close_loader, self.ev_loader)
            start_workers(self.ev_loader)
        if decoder is not None:  # decode: gpu - the batch's JPEGs decoded and cropped on the device, before any use
            loader = decoder.wrap(loader)
        if self.teacher is not None:  # e.g. requests of the next teacher.prefetch steps in flight
            loader = self.teacher.feed(loader, self.lam)
        self.data = DataFeed(loader)

    def _gpu_decoder(self, aug: AugmentParams) -> GpuDecoder:
        """The device-side decode step of ``data.decode: gpu`` (nvImageCodec on this worker's GPU, or the
        session's stand-in decoder)."""
        decode = getattr(self.session, "window_decoder", None)
        if decode is None:
            if self.device.type != "cuda":
                raise DataError(f"data.decode: 'gpu' needs a CUDA device, and this training worker runs on "
                                f"{self.device}; set resources.use_gpu: true on GPU workers, or data.decode: cpu")
            decode = NvImageCodecDecoder(self.device)
        return GpuDecoder(self.device, aug, decode)

    def _build_components(self) -> None:
        plan, sched = self.plan, self.spec.schedule
        sink, self.wb = _sinks(plan, self.session, self.start_step)
        self.logger = MetricLogger(sink, sched.log_every, plan.total_steps, self.world, self.spec.data.batch_size)
        self.evaluator = Evaluator(self._evaluate if self.ev_loader is not None else None,
                                   sched.eval_every or plan.total_steps, plan.total_steps)
        self.preemption = PreemptionCheck(self.session.preemption, self.spec.fault_tolerance.check_every, self.world,
                                          self.flag_group)
        self.autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def lam(self, step: int) -> float:
        """The mixup weight of global step ``step`` (the same on every rank and in a resumed run)."""
        return mixup_lambda(self.spec.seed, step, self.spec.augment.mixup_alpha)

    def _evaluate(self) -> dict[str, float]:
        return evaluate(self.student, self.teacher, self.ev_loader, self.norm, self.device, self.world, self.amp)

    def run(self) -> StageResult:
        """Train from the restored step to the last one; returns the stage's result (published on rank 0)."""
        total, ckpt, log = self.plan.total_steps, self.checkpointer, self.logger
        if self.net is not None:
            self.net.train()
        self.method.train()
        if self.rng is not None:  # last thing before the first step: building loaders and sinks draws from the RNGs
            set_rng_state(self.rng)
        loop_t0 = time.perf_counter()
        for step in range(self.start_step, total):
            batch = self.data.next(step)
            lam = self.lam(step)
            self._step(batch, lam, step)
            done = step + 1
            if log.should_log(done):
                log.flush(done, self._window_metrics(lam),
                          then=self.evaluator if self.evaluator.should_eval(done) else None)
            elif self.evaluator.should_eval(done):
                log.log(done, self.evaluator())
            if ckpt.should_save(done):
                ckpt.save(done)
            elif self.preemption.should_check(done):
                preempted, time_due = self.preemption.poll(ckpt.time_due())
                if preempted:
                    self._stop(done)
                if time_due:
                    ckpt.save(done)
        ckpt.finish(self.plan.stage)
        return self._finish(time.perf_counter() - loop_t0)

    def _step(self, batch: dict[str, Any], lam: float, step: int) -> None:
        """One optimizer step: forward passes and loss terms, backward, gradient averaging and clipping."""
        stats: dict[str, torch.Tensor] = {}
        terms = train_step(batch, lam, net=self.net, teacher=self.teacher, method=self.method, norm=self.norm,
                           device=self.device, autocast=self.autocast, step=step, stats=stats)
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_grads(self.method_params, self.world)
        if self.spec.optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.optimizer.grad_clip_norm)
        optimizer_step(self.optimizer, self.spec.optimizer.name, self.spec.seed, step)
        self.sched.step()
        self.logger.add(loss, terms, stats)

    def _window_metrics(self, lam: float) -> dict[str, float]:
        """The other components' figures of this log window (called at log steps on every rank)."""
        out = self.method.metrics() | self.checkpointer.pop_metrics()
        if self.teacher is not None:
            out |= self.teacher.metrics()
        return out | {"lr": self.sched.get_last_lr()[0], "mixup_lambda": lam} | self.data.window_metrics()

    def _stop(self, done: int) -> None:
        """Preempted: checkpoint at ``done``, wait for it within the grace period, and stop."""
        t_notice = time.monotonic()
        self.checkpointer.save(done)
        grace = self.spec.fault_tolerance.preemption_grace_s - (time.monotonic() - t_notice)
        saved = self.checkpointer.wait_saved(grace, self.flag_group)
        flag = self.session.preemption
        if saved:
            flag.saved.set()
        self.logger.sink.close()
        raise Preempted(self.plan.stage, done, flag.reason or "preemption on another rank", saved)

    def _finish(self, loop_s: float) -> StageResult:
        plan = self.plan
        steps_run = plan.total_steps - self.start_step
        metrics = self.logger.last
        if not metrics:  # resumed after the final checkpoint: nothing ran, but the stage still needs its result
            metrics = self.evaluator()
        result = StageResult(stage=plan.stage, steps=plan.total_steps, resumed_from=self.start_step,
                             final_metrics=metrics,
                             images_per_s=steps_run * self.spec.data.batch_size / max(loop_s, 1e-9) if steps_run else 0.0,
                             wall_s=time.perf_counter() - self.t_start, wandb_dir=getattr(self.wb, "dir", None),
                             wandb_url=getattr(self.wb, "url", None))
        self.logger.sink.close()
        if self.rank == 0:
            _publish(plan, self.model, self.method, result)
        if self.world > 1:
            dist.barrier()
        return result


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


__all__ = ["StageResult", "StageRunner", "default_normalization", "evaluate", "run_stage", "stage_done"]
