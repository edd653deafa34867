"""Labelling: the teacher's top-N probabilities (or every class's logit) on K augmentation views of every
training sample, one data shard
at a time (``kd-cluster teacher label``; the Ray side that spreads shards over workers is
``kd_cluster.cluster.labeling``). Each shard's sidecar is written once, atomically, so an interrupted labelling
continues with the shards it had not finished. Pure torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kd_cluster.data import Manifest
from kd_cluster.data.augment import image_size, render_views
from kd_cluster.data.shards import read_shard
from kd_cluster.data.soft_labels import MAX_BOX, LabelConfig, label_view, sidecar_name, write_sidecar
from kd_cluster.data._util import url_to_fs
from kd_cluster.urls import join
from kd_cluster.teacher.base import TeacherContext, TeacherPlan

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class LabelJob:
    """Everything a labelling worker needs (picklable: it is sent to Ray workers)."""

    teacher: TeacherPlan
    """The teacher to run (placement colocated: each worker loads it)."""
    data: Manifest
    out: str
    config: LabelConfig
    data_options: dict[str, Any] | None = None
    out_options: dict[str, Any] | None = None
    batch_size: int = 256
    """Images per teacher forward."""
    amp: bool = True
    channels_last: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def sidecar_url(self, j: int) -> str:
        return join(self.out, sidecar_name(self.data.shards[j].url))

    def pending(self) -> list[int]:
        """Shards whose sidecar is not written yet."""
        fs, _ = url_to_fs(self.out, self.out_options)
        return [j for j in range(len(self.data.shards))
                if not fs.exists(url_to_fs(self.sidecar_url(j), self.out_options)[1])]


class Labeller:
    """Loads the teacher once and labels shards."""

    def __init__(self, job: LabelJob, device: torch.device | None = None) -> None:
        from kd_cluster.models import Normalizer
        from kd_cluster.teacher import build_teacher

        self.job = job
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = self.device.type == "cuda"
        amp = torch.bfloat16 if (on_gpu and job.amp) else None
        channels_last = on_gpu and job.channels_last
        with torch.random.fork_rng(devices=[]):
            self.teacher = build_teacher(job.teacher, TeacherContext(device=self.device, rank=0, amp=amp,
                                                                     channels_last=channels_last, expand=lambda x: x))
        self.norm = Normalizer(list(job.teacher.mean), list(job.teacher.std), channels_last).to(self.device)

    @torch.no_grad()
    def _outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """What the label set stores of the teacher's output on a batch of views."""
        raw = torch.from_numpy(images)
        logits = self.teacher.evaluate(self.norm(raw.to(self.device)), raw).logits.float()
        if self.job.config.form == "logits":
            return {"logits": logits.cpu().numpy()}
        top = torch.softmax(logits, dim=1).topk(self.job.config.top_k, dim=1)
        return {"probs": top.values.cpu().numpy(), "classes": top.indices.cpu().numpy()}

    def label_shard(self, j: int) -> dict[str, float]:
        """Label shard ``j`` and write its sidecar; returns what it did (samples, bytes, seconds)."""
        t0 = time.perf_counter()
        cfg, job = self.job.config, self.job
        shard = job.data.shards[j]
        n, k_views, top_n = shard.count, cfg.views, cfg.top_k
        aug = cfg.augment()
        a = {"index": np.full(n, -1, dtype=np.int64), "valid": np.zeros(n, dtype=np.uint8),
             "boxes": np.zeros((n, k_views, 4), dtype=np.uint16), "flips": np.zeros((n, k_views), dtype=np.uint8)}
        if cfg.form == "logits":
            a["logits"] = np.zeros((n, k_views, cfg.num_classes), dtype=np.float16)
        else:
            a["probs"] = np.zeros((n, k_views, top_n), dtype=np.float16)
            a["classes"] = np.zeros((n, k_views, top_n), dtype=np.int16 if cfg.num_classes <= 32767 else np.int32)
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        buf, owners = np.empty((max(job.batch_size, k_views), *shape), dtype=np.uint8), []

        def flush() -> None:
            if not owners:
                return
            outputs = self._outputs(buf[:len(owners)])
            for row, (p, k) in enumerate(owners):
                for name, values in outputs.items():
                    a[name][p, k] = values[row]
            owners.clear()

        for p, sample in enumerate(read_shard(shard, job.data_options)):
            if len(owners) + k_views > len(buf):
                flush()
            try:
                a["index"][p] = int(sample["idx"])  # type: ignore[index]
                data = next(sample[x] for x in _IMAGE_KEYS if x in sample)  # type: ignore[operator]
                w, h = image_size(data)
                views = [label_view(w, h, aug, cfg.seed, j, p, k) for k in range(k_views)]
                if max(max(v.box) for v in views) > MAX_BOX:
                    raise ValueError(f"larger than {MAX_BOX} px")
                start = len(owners)
                render_views(data, views, aug, [buf[start + k] for k in range(k_views)])
            except Exception:  # noqa: BLE001 - a sample that cannot be decoded is not labelled (skipped in training)
                continue
            for k, v in enumerate(views):
                a["boxes"][p, k], a["flips"][p, k] = [round(c) for c in v.box], v.flip
                owners.append((p, k))
            a["valid"][p] = 1
        flush()
        size = write_sidecar(job.sidecar_url(j), a, job.out_options)
        return {"shard": float(j), "samples": float(int(a["valid"].sum())), "bytes": float(size),
                "seconds": time.perf_counter() - t0}


__all__ = ["LabelJob", "Labeller"]
