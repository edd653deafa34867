"""``kd-cluster teacher label``: the job's teacher over K views of every training sample, shards spread over
Ray workers (each loads the teacher once), or in this process without Ray. Finished shards are skipped, so an
interrupted labelling is continued by running the same command again."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from kd_cluster.config import JobSpec, SpecError, with_settings
from kd_cluster.data import LabelConfig, LabelSet, load_manifest
from kd_cluster.data.soft_labels import finish_labels, start_labels
from kd_cluster.storage import storage_options
from kd_cluster.urls import absolute, join
from kd_cluster.teacher.label import LabelJob, Labeller


@ray.remote
class LabelActor:
    """One labelling worker: the teacher loaded once, shards labelled on request."""

    def __init__(self, job: LabelJob, threads: int) -> None:
        import torch

        from kd_cluster.models import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.labeller = Labeller(job, device)

    def label(self, j: int) -> dict[str, float]:
        return self.labeller.label_shard(j)


@dataclass
class LabelResult:
    """What a labelling run did."""

    labels: LabelSet
    shards_labelled: int
    shards_skipped: int
    samples: int
    bytes: int
    wall_s: float


def _for_labelling(spec: JobSpec) -> JobSpec:
    """The job with its teacher run in the labeller's process: stored labels are what is being made."""
    here = {"placement": "colocated", "labels": None}
    changes: dict[str, Any] = {"teacher": here} if spec.teacher else {}
    stages = {st.name: {"set": {"teacher": here}} for st in spec.stages if isinstance(st.set.get("teacher"), dict)}
    return with_settings(spec, {**changes, "stages": stages} if stages else changes)


def label_job(spec: JobSpec, source: str, *, views: int | None = None, top_k: int | None = None,
              out: str | None = None, stage: str | None = None, use_ray: bool = True, address: str | None = None,
              workers: int | None = None, batch_size: int | None = None, logits: bool | None = None,
              progress: Callable[[str], None] = print) -> LabelResult:
    """``kd-cluster teacher label``: the job's labelling stage (``stage``, or its first), or else the first stage
    that distills from a teacher, labelled with that stage's teacher, data and augmentation."""
    from kd_cluster.train import plan_job

    plans = [p for p in plan_job(_for_labelling(spec), source, check_data="all") if p.teacher is not None]
    if stage is not None:
        plans = [p for p in plans if p.stage == stage]
    plans.sort(key=lambda p: p.labels is None)  # a labelling stage first
    if not plans:
        raise SpecError(source, [f"no stage {'named ' + repr(stage) + ' ' if stage else ''}stores labels or distills "
                                 "from a teacher: nothing to label"])
    plan = plans[0]
    views = views or (plan.labels.views if plan.labels else None)
    if views is None:
        raise SpecError(source, [f"stage {plan.stage!r} does not say how many views to store: give --views"])
    top_k = top_k or (plan.labels.top_k if plan.labels else 10)
    default_out = plan.labels_url if plan.labels else (
        spec.teacher.labels if spec.teacher is not None and spec.teacher.labels and
        not spec.teacher.labels.startswith("stage:") else None)
    logits = logits if logits is not None else bool(plan.labels and plan.labels.logits)
    return make_labels(plan, out or default_out, views, top_k, source=source, use_ray=use_ray, address=address,
                       workers=workers or (plan.labels.workers if plan.labels else None),
                       batch_size=batch_size or (plan.labels.batch if plan.labels else 256), progress=progress,
                       form="logits" if logits else "topk")


def run_label_stage(plan: Any, *, use_ray: bool, address: str | None,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """A job's labelling stage: store the labels at ``plan.labels_url``, then the stage's completion marker."""
    from kd_cluster.storage import Store

    assert plan.labels is not None
    res = make_labels(plan, plan.labels_url, plan.labels.views, plan.labels.top_k, source=plan.stage,
                      use_ray=use_ray, address=address, workers=plan.labels.workers, batch_size=plan.labels.batch,
                      progress=progress, form="logits" if plan.labels.logits else "topk")
    marker = {"stage": plan.stage, "steps": 0, "resumed_from": 0, "final_metrics": {},
              "images_per_s": res.samples * plan.labels.views / max(res.wall_s, 1e-9), "wall_s": res.wall_s,
              "arch": plan.arch, "artifact": res.labels.url, "labels": res.labels.url,
              "shards_labelled": res.shards_labelled, "bytes": res.bytes}
    Store(plan.stage_url, plan.spec.storage.endpoint_url).write_json("stage.json", marker)
    return marker


def make_labels(plan: Any, out: str | None, views: int, top_k: int, *, source: str, use_ray: bool,
                address: str | None, workers: int | None, batch_size: int,
                progress: Callable[[str], None], form: str = "topk") -> LabelResult:
    """Label ``plan``'s train split with its (colocated) teacher into ``out``; finished shards are skipped.
    ``form``: ``topk`` (the top-N probabilities per view) or ``logits`` (every class's logit)."""
    from kd_cluster.models import weights_sha256

    t = plan.teacher
    assert t is not None
    if views < 1 or top_k < 1:
        raise SpecError(source, [f"views and top-k must be >= 1, got {views} and {top_k}"])
    if t.num_classes and top_k > t.num_classes:
        raise SpecError(source, [f"top-k {top_k}: the data has only {t.num_classes} classes"])
    members = []
    for m in t.members:
        digest = weights_sha256(m.weights or "", storage_options=storage_options(m.weights or "", t.endpoint_url))
        if digest is None:
            raise SpecError(source, [f"teacher.weights: cannot read {m.weights!r} (a stage that trains the teacher "
                                     "must have finished before its predictions can be stored)"])
        members.append({"name": m.name, "arch": m.arch, "weight": m.weight, "weights_sha256": digest})
    eff = plan.spec
    data = load_manifest(plan.train_manifest, storage_options(plan.train_manifest, eff.data.endpoint_url))
    config = LabelConfig(teacher={"members": members}, views=views, top_k=top_k, num_classes=t.num_classes,
                         channels=t.channels, image_size=eff.data.image_size,
                         crop_scale=tuple(eff.augment.crop_scale), crop_ratio=tuple(eff.augment.crop_ratio),
                         flip=eff.augment.flip, seed=eff.seed, data_samples=data.num_samples,
                         data_shards=[s.count for s in data.shards], form=form)
    archs = "+".join(m["arch"] for m in members).replace(":", "_")
    kind = "logits" if form == "logits" else f"n{top_k}"
    out = absolute(out or join(data.url.rsplit("/", 1)[0], f"soft-labels-{archs}-k{views}-{kind}"))
    out_opts = storage_options(out, eff.storage.endpoint_url)
    start_labels(out, config, out_opts)
    job = LabelJob(teacher=t, data=data, out=out, config=config,
                   data_options=storage_options(data.url, eff.data.endpoint_url), out_options=out_opts,
                   batch_size=batch_size, amp=eff.resources.amp, channels_last=eff.resources.channels_last)
    pending = job.pending()
    progress(f"[{plan.stage}] labelling {data.num_samples} samples ({len(data.shards)} shards, "
             f"{len(data.shards) - len(pending)} already done) with {'+'.join(m['arch'] for m in members)}: "
             f"K={views} views, {'every logit' if form == 'logits' else f'top-{top_k}'}, into {out}")
    t0 = time.perf_counter()
    done: list[dict[str, float]] = []
    if use_ray and pending:
        done = _label_on_ray(job, pending, plan, address, workers, progress)
    elif pending:
        labeller = Labeller(job)
        for j in pending:
            done.append(labeller.label_shard(j))
            progress(f"  shard {j + 1}/{len(data.shards)}: {int(done[-1]['samples'])} samples, "
                     f"{done[-1]['seconds']:.1f} s")
    labels = finish_labels(out, config, data, out_opts)
    return LabelResult(labels=labels, shards_labelled=len(done), shards_skipped=len(data.shards) - len(pending),
                       samples=int(sum(d["samples"] for d in done)), bytes=int(sum(d["bytes"] for d in done)),
                       wall_s=time.perf_counter() - t0)


def _label_on_ray(job: LabelJob, pending: list[int], plan: Any, address: str | None, workers: int | None,
                  progress: Callable[[str], None]) -> list[dict[str, float]]:
    from ray.util import ActorPool

    from kd_cluster.cluster.local_ray import ensure_ray

    member = plan.teacher.members[0]
    n = max(1, min(workers or member.replicas, len(pending)))
    cpus = max(member.num_cpus, 0.0)
    ensure_ray(address, max(math.ceil(n * cpus), os.cpu_count() or 1))
    opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": member.num_gpus}
    if member.resource:
        opts["resources"] = {member.resource: 1}
    actors = [LabelActor.options(**opts).remote(job, max(1, int(cpus))) for _ in range(n)]
    try:
        out = []
        for res in ActorPool(actors).map_unordered(lambda a, j: a.label.remote(j), pending):
            out.append(res)
            progress(f"  shard {int(res['shard']) + 1}/{len(job.data.shards)}: {int(res['samples'])} samples, "
                     f"{res['seconds']:.1f} s ({len(out)}/{len(pending)} done)")
        return out
    finally:
        for a in actors:
            ray.kill(a)


__all__ = ["LabelActor", "LabelResult", "label_job", "make_labels", "run_label_stage"]
