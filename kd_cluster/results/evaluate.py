"""Evaluate a trained model on a split: top-1, top-5, per-class accuracy, expected calibration error, agreement
with a teacher, images/s, and the confusion matrix (as counts and as a PNG).

The input is what training evaluates on: :class:`~kd_cluster.data.EvalStream` (the center view) and the
run's normalisation, so a run's stage evaluated on its own val split gives the run's final eval numbers.
Everything a worker computes is a count (:class:`EvalCounts`), so the shares of several workers (each a rank
of the split, as in training) add up to the same result as one pass.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kd_cluster.results.target import Member, ModelRef

ECE_BINS = 15


@dataclass(frozen=True)
class EvalTask:
    """What one evaluation worker needs (picklable: it travels to Ray workers)."""

    arch: str
    weights: str
    data: str
    """Manifest URL/path of the split (or a builtin set)."""
    image_size: int
    eval_resize_ratio: float
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    weights_endpoint_url: str | None = None
    data_endpoint_url: str | None = None
    batch_size: int = 256
    loader_workers: int = 1
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda" or "cuda:N"."""
    amp: bool = False
    """bf16 autocast on a GPU (what training's evaluation does with ``resources.amp``); ignored on CPU."""
    teacher: tuple[Member, ...] = ()
    """The teacher's member(s): an ensemble's logits are ``log(sum_i w_i softmax(z_i))``, as in training."""
    teacher_endpoint_url: str | None = None


@dataclass
class EvalCounts:
    """Additive evaluation counts of one worker's share of a split."""

    confusion: np.ndarray
    """[true class, predicted class] counts."""
    top5: int = 0
    ece_count: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    ece_confidence: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.float64))
    ece_correct: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    teacher_correct: int = 0
    agree: int = 0
    has_teacher: bool = False
    seconds: float = 0.0
    """Wall time of the pass (data + forward)."""

    @property
    def n(self) -> int:
        """Samples counted."""
        return int(self.confusion.sum())

    def __add__(self, other: EvalCounts) -> EvalCounts:
        assert self.confusion.shape == other.confusion.shape and self.has_teacher == other.has_teacher
        return EvalCounts(confusion=self.confusion + other.confusion, top5=self.top5 + other.top5,
                          ece_count=self.ece_count + other.ece_count,
                          ece_confidence=self.ece_confidence + other.ece_confidence,
                          ece_correct=self.ece_correct + other.ece_correct,
                          teacher_correct=self.teacher_correct + other.teacher_correct, agree=self.agree + other.agree,
                          has_teacher=self.has_teacher, seconds=max(self.seconds, other.seconds))


def task_for(ref: ModelRef, data: str, *, teacher: tuple[Member, ...] = (), teacher_endpoint_url: str | None = None,
             data_endpoint_url: str | None = None, batch_size: int = 256, loader_workers: int = 1,
             device: str = "auto", amp: bool = False) -> EvalTask:
    """The evaluation of ``ref`` (and of ``teacher``, and the agreement with it) on the split at ``data``."""
    p = ref.preprocess
    return EvalTask(arch=ref.arch, weights=ref.weights, data=data, image_size=p.image_size,
                    eval_resize_ratio=p.eval_resize_ratio, mean=p.mean, std=p.std,
                    weights_endpoint_url=ref.endpoint_url, data_endpoint_url=data_endpoint_url,
                    batch_size=batch_size, loader_workers=loader_workers, device=device, amp=amp,
                    teacher=teacher, teacher_endpoint_url=teacher_endpoint_url)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    return dev


def evaluate_share(task: EvalTask, rank: int = 0, world_size: int = 1) -> EvalCounts:
    """Evaluate rank ``rank``'s share of the split (positions ``rank, rank + world_size, ...``, as training's
    evaluation splits it): build the model (and teacher), stream the center view, count."""
    import torch

    from kd_cluster.data import AugmentParams, EvalStream, close_loader, load_manifest, make_eval_loader
    from kd_cluster.models import Normalizer, build_model, load_weights
    from kd_cluster.storage import storage_options
    from kd_cluster.teacher.ensemble import combine

    device = _device(task.device)
    manifest = load_manifest(task.data, storage_options(task.data, task.data_endpoint_url))
    c, k = manifest.num_classes, manifest.channels

    def model_at(arch: str, weights: str, endpoint: str | None) -> torch.nn.Module:
        m = build_model(arch, num_classes=c, in_chans=k)
        load_weights(m, weights, storage_options=storage_options(weights, endpoint))
        on_gpu = device.type == "cuda"
        return m.eval().requires_grad_(False).to(
            device, memory_format=torch.channels_last if on_gpu else torch.preserve_format)

    model = model_at(task.arch, task.weights, task.weights_endpoint_url)
    members = [model_at(m.arch, m.weights, task.teacher_endpoint_url) for m in task.teacher]

    def teacher_logits(x: torch.Tensor) -> torch.Tensor:
        with amp:
            logits = [t(x).float() for t in members]
        return logits[0] if len(logits) == 1 else combine(logits, [m.weight for m in task.teacher])

    from kd_cluster.results.target import Preprocess

    mean, std = Preprocess(task.image_size, task.eval_resize_ratio, task.mean, task.std).normalization(k)
    norm = Normalizer(mean, std, channels_last=device.type == "cuda").to(device)
    aug = AugmentParams(image_size=task.image_size, eval_resize_ratio=task.eval_resize_ratio, channels=k)
    stream = EvalStream(manifest, batch_size=task.batch_size, rank=rank, world_size=world_size, augment=aug,
                        storage_options=storage_options(task.data, task.data_endpoint_url))
    loader = make_eval_loader(stream, num_workers=task.loader_workers)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if task.amp and device.type == "cuda" \
        else contextlib.nullcontext()

    confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
    ece = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # count, sum of confidence, correct
    extra = torch.zeros(3, dtype=torch.int64, device=device)  # top5, teacher correct, agreement
    kk = min(5, c)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in loader:
                x = norm(batch["image"].to(device, non_blocking=True))
                y = batch["label"].to(device, non_blocking=True)
                with amp:
                    logits = model(x)
                logits = logits.float()
                topk = logits.topk(kk, dim=1).indices
                pred = topk[:, 0]  # as training's evaluation takes it (ties resolve the same way)
                confusion += torch.bincount(y * c + pred, minlength=c * c)
                extra[0] += (topk == y[:, None]).any(dim=1).sum()
                conf = logits.softmax(dim=1).amax(dim=1).double()
                bins = (conf * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1  # bin b holds (b/15, (b+1)/15]
                hit = (pred == y).double()
                ece[0] += torch.bincount(bins, minlength=ECE_BINS).double()
                ece[1] += torch.bincount(bins, weights=conf, minlength=ECE_BINS)
                ece[2] += torch.bincount(bins, weights=hit, minlength=ECE_BINS)
                if members:
                    t_pred = teacher_logits(x).argmax(dim=1)
                    extra[1] += (t_pred == y).sum()
                    extra[2] += (t_pred == pred).sum()
        confusion_np = confusion.view(c, c).cpu().numpy()
        ece_np, extra_np = ece.cpu().numpy(), extra.cpu().numpy()  # the pass's only host sync
    finally:
        close_loader(loader)
    return EvalCounts(confusion=confusion_np, top5=int(extra_np[0]), ece_count=ece_np[0].round().astype(np.int64),
                      ece_confidence=ece_np[1], ece_correct=ece_np[2].round().astype(np.int64),
                      teacher_correct=int(extra_np[1]), agree=int(extra_np[2]), has_teacher=bool(members),
                      seconds=time.perf_counter() - t0)


def summarize(counts: EvalCounts, classes: list[str]) -> dict[str, Any]:
    """The metrics of a pass (or of several workers' shares added up)."""
    n = max(counts.n, 1)
    cm = counts.confusion
    per_class = [{"class": name, "n": int(cm[i].sum()), "top1": float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None}
                 for i, name in enumerate(classes)]
    ece = float(np.abs(counts.ece_correct - counts.ece_confidence).sum() / n)
    out: dict[str, Any] = {
        "samples": counts.n, "top1": float(np.trace(cm) / n), "top5": counts.top5 / n, "ece": ece,
        "ece_bins": ECE_BINS, "per_class": per_class,
        "calibration": [{"bin": [b / ECE_BINS, (b + 1) / ECE_BINS], "n": int(counts.ece_count[b]),
                         "confidence": float(counts.ece_confidence[b] / counts.ece_count[b]) if counts.ece_count[b] else None,
                         "accuracy": float(counts.ece_correct[b] / counts.ece_count[b]) if counts.ece_count[b] else None}
                        for b in range(ECE_BINS)],
        "images_per_s": counts.n / max(counts.seconds, 1e-9), "seconds": counts.seconds,
    }
    if counts.has_teacher:
        out |= {"teacher_top1": counts.teacher_correct / n, "agreement": counts.agree / n}
    return out


RUN_EVAL_KEYS = {"top1": "eval/student_top1", "top5": "eval/student_top5", "teacher_top1": "eval/teacher_top1",
                 "agreement": "eval/agreement"}
"""Our metric name -> the name of the same number in a run's final metrics."""


def compare_with_run(metrics: dict[str, Any], final: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each metric that the run's final eval also has: ours, the run's and the difference."""
    return {k: {"eval": metrics[k], "run": final[rk], "diff": metrics[k] - final[rk]}
            for k, rk in RUN_EVAL_KEYS.items() if k in metrics and rk in final}


ShareRunner = Callable[[EvalTask, int], tuple[EvalCounts, float]]
"""Runs ``num_workers`` shares of an evaluation somewhere (e.g. on Ray workers); returns their added-up counts and
the wall time."""


def evaluate(ref: ModelRef, data: str, out: str, *, teacher: tuple[Member, ...] = (),
             teacher_endpoint_url: str | None = None,
             data_endpoint_url: str | None = None, out_endpoint_url: str | None = None, batch_size: int = 256,
             loader_workers: int = 1, device: str = "auto", amp: bool = False, num_workers: int = 1,
             runner: ShareRunner | None = None) -> dict[str, Any]:
    """Evaluate ``ref`` on the split at ``data``; write the result as JSON to ``out`` and the confusion matrix
    next to it (``<out stem>.confusion.png``); return the result.

    ``num_workers`` > 1 splits the split into that many shares, run by ``runner`` (in this process, one after
    the other, without one)."""
    from kd_cluster.data import load_manifest
    from kd_cluster.results.store import write_file
    from kd_cluster.storage import storage_options

    manifest = load_manifest(data, storage_options(data, data_endpoint_url))
    task = task_for(ref, data, teacher=teacher, teacher_endpoint_url=teacher_endpoint_url,
                    data_endpoint_url=data_endpoint_url, batch_size=batch_size, loader_workers=loader_workers,
                    device=device, amp=amp)
    t0 = time.perf_counter()
    if num_workers > 1 and runner is not None:
        counts, wall = runner(task, num_workers)
    else:  # the shares one after the other, in this process
        counts = functools.reduce(lambda a, b: a + b, (evaluate_share(task, r, num_workers) for r in range(num_workers)))
        wall = time.perf_counter() - t0
        if num_workers > 1:
            counts.seconds = wall
    metrics = summarize(counts, list(manifest.classes))
    stem = out[:-5] if out.endswith(".json") else out
    png = f"{stem}.confusion.png"
    result: dict[str, Any] = {
        "model": ref.origin(), "data": data, "device": str(_device(device)), "num_workers": num_workers,
        "loader_workers": loader_workers, "batch_size": batch_size, "amp": amp, **metrics, "wall_s": wall,
        "teacher": [asdict(m) for m in teacher] or None,
        "run_final_eval": compare_with_run(metrics, ref.final_metrics) if ref.final_metrics else None,
        "confusion_matrix": counts.confusion.tolist(),
    }
    result["confusion_png"] = confusion_png(counts.confusion, list(manifest.classes), png,
                                            f"{ref.label} on {manifest.name}/{manifest.split} "
                                            f"(top-1 {metrics['top1']:.4f})", out_endpoint_url)
    result["json"] = write_file(out, json.dumps(result, indent=2).encode(), out_endpoint_url)
    return result


def confusion_png(confusion: np.ndarray, classes: list[str], path: str, title: str,
                  endpoint_url: str | None = None) -> str:
    """Write the row-normalised confusion matrix (counts annotated for up to 20 classes) as a PNG; returns
    where it went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kd_cluster.results.store import write_file

    c = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=np.float64), where=rows > 0)
    side = min(4 + 0.45 * c, 14)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=90 if c > 10 else 0)
        ax.set_yticks(range(c), classes)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_file(path, buf.getvalue(), endpoint_url)


__all__ = ["ECE_BINS", "EvalCounts", "EvalTask", "ShareRunner", "compare_with_run", "confusion_png", "evaluate",
           "evaluate_share", "summarize", "task_for"]
