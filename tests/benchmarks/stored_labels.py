"""Stored soft labels against a live teacher, on mnist5k: ``python tests/benchmarks/stored_labels.py``.

1. A cnn_m teacher is trained once (``--teacher-steps``, 600: the demo's teacher recipe without mixup).
2. The train split (4,000 digits) is labelled with it for K = 1, 10, 50 views (top-5), timed; sidecar bytes per
   sample are read off the files.
3. Accuracy: for each seed, KD (T = 4, alpha = 0.9, no mixup) into cnn_xs for ``--steps`` steps from the same
   initialisation and data order, with the teacher live (colocated) and with each label set (placement stored).
   Mean ± std of the val top-1 over the seeds, every run listed.
4. Speed: student images/s of a stage with a colocated cnn_l teacher against the same stage with stored labels,
   in alternating rounds (the ratio of each round; the medians), and the labelling cost that pays off.

One process, no Ray (``--no-ray`` semantics); the machine and its load are printed with the results.
Options: ``--seeds``, ``--steps``, ``--teacher-steps``, ``--views``, ``--top-k``, ``--speed-steps``, ``--rounds``, ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BASE: dict[str, Any] = {
    "seed": 0,
    "student": {"arch": "cnn_xs"},
    "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
    "data": {"train": "builtin://mnist5k/train", "val": "builtin://mnist5k/val", "image_size": 28,
             "batch_size": 128, "loader_workers": 1},
    "augment": {"crop_scale": [0.7, 1.0], "crop_ratio": [0.8, 1.25], "flip": False, "mixup_alpha": 0.0,
                "eval_resize_ratio": 1.0},
    "schedule": {"steps": 1500, "warmup_steps": 60, "log_every": 100, "eval_every": 1500, "checkpoint_every": 1500},
    "optimizer": {"name": "adamw", "lr": 0.006, "weight_decay": 0.0005, "grad_clip_norm": 5.0},
    "resources": {"num_workers": 1},
}


def _job(out: Path, name: str, **sections: Any) -> Path:
    job = copy.deepcopy(BASE)
    job["name"] = name
    job["storage"] = {"path": str(out / "runs")}
    job["telemetry"] = {"wandb_mode": "disabled", "wandb_dir": str(out / "tel" / "wandb"), "progress": False}
    for k, v in sections.items():  # a method or teacher section replaces the base's; others are merged
        job[k] = {**job[k], **v} if k not in ("method", "teacher") and isinstance(job.get(k), dict) else v
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _run(path: Path) -> dict[str, Any]:
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    return run_job(load_job(path), str(path), use_ray=False).stages["main"]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--views", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--speed-steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from kd_cluster.cluster.labeling import label_job
    from kd_cluster.config import load_job

    out = Path(a.out or tempfile.mkdtemp(prefix="kdc-stored-"))
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    lines = []
    teacher = _run(_job(out, "teacher", student={"arch": "cnn_m"}, method={"name": "supervised"},
                        schedule={"steps": a.teacher_steps, "warmup_steps": min(40, a.teacher_steps // 2),
                                  "eval_every": a.teacher_steps, "checkpoint_every": a.teacher_steps}))
    t_weights = str(out / "runs" / "teacher" / "main" / "model.safetensors")
    lines.append(f"teacher cnn_m: val top-1 {teacher['final_metrics']['eval/student_top1']:.4f}")
    live_teacher = {"arch": "cnn_m", "weights": t_weights}
    labels: dict[int, tuple[str, float, float]] = {}
    for k in a.views:
        job = _job(out, f"label-k{k}", teacher=live_teacher, schedule={"steps": a.steps})
        res = label_job(load_job(job), str(job), views=k, top_k=a.top_k, out=str(out / f"labels-k{k}"),
                        use_ray=False, progress=lambda s: None)
        labels[k] = (str(out / f"labels-k{k}"), res.wall_s, res.bytes / res.samples)
    rows = ["| student cnn_xs, KD from cnn_m | val top-1, mean ± std | " + " | ".join(f"seed {s}" for s in a.seeds)
            + " |", "|---|---|" + "---|" * len(a.seeds)]
    configs = [("live teacher (colocated)", {"teacher": live_teacher})]
    configs += [(f"stored labels, K = {k}", {"teacher": {**live_teacher, "placement": "stored", "labels": labels[k][0]}})
                for k in a.views]
    for ci, (label, sec) in enumerate(configs):
        tops = []
        for s in a.seeds:
            tops.append(_run(_job(out, f"acc-{ci}-s{s}", seed=s, schedule={"steps": a.steps}, **sec))["final_metrics"]
                        ["eval/student_top1"])
        sd = statistics.stdev(tops) if len(tops) > 1 else 0.0
        rows.append(f"| {label} | {statistics.mean(tops):.4f} ± {sd:.4f} | " + " | ".join(f"{t:.4f}" for t in tops)
                    + " |")
    # speed: a heavier colocated teacher (cnn_l, random weights: speed only) against stored labels
    import torch

    from kd_cluster.models import build_model, save_weights

    torch.manual_seed(0)
    big = str(out / "cnn_l.safetensors")
    save_weights(build_model("cnn_l", num_classes=10, in_chans=1), big)
    k_speed = max(a.views)
    big_job = _job(out, "label-big", teacher={"arch": "cnn_l", "weights": big}, schedule={"steps": a.speed_steps})
    big_labels = label_job(load_job(big_job), str(big_job), views=k_speed, top_k=a.top_k, out=str(out / "labels-big"),
                           use_ray=False, progress=lambda s: None)
    col, sto, ratios = [], [], []
    for r in range(a.rounds):
        sched = {"steps": a.speed_steps, "log_every": a.speed_steps, "eval_every": a.speed_steps,
                 "checkpoint_every": a.speed_steps}
        c = _run(_job(out, f"speed-col-{r}", teacher={"arch": "cnn_l", "weights": big}, schedule=sched))["images_per_s"]
        s_ = _run(_job(out, f"speed-sto-{r}", teacher={"arch": "cnn_l", "weights": big, "placement": "stored",
                                                        "labels": str(out / "labels-big")}, schedule=sched))["images_per_s"]
        col.append(c), sto.append(s_), ratios.append(s_ / c)
    c_med, s_med = statistics.median(col), statistics.median(sto)
    epoch_col, epoch_sto = 4000 / c_med, 4000 / s_med
    break_even = big_labels.wall_s / max(epoch_col - epoch_sto, 1e-9)
    lines.append("")
    lines.append("| label set (4,000 digits, top-%d) | labelling s | sidecar bytes per sample |" % a.top_k)
    lines.append("|---|---|---|")
    for k in a.views:
        lines.append(f"| K = {k} (cnn_m) | {labels[k][1]:.1f} | {labels[k][2]:,.0f} |")
    lines.append(f"| K = {k_speed} (cnn_l) | {big_labels.wall_s:.1f} | {big_labels.bytes / big_labels.samples:,.0f} |")
    lines.append("")
    lines.append("| student cnn_xs, 28 px, batch 128, one process | images/s (median of %d rounds) |" % a.rounds)
    lines.append("|---|---|")
    lines.append(f"| KD, teacher cnn_l colocated | {c_med:.0f} (rounds: {', '.join(f'{x:.0f}' for x in col)}) |")
    lines.append(f"| KD, cnn_l's labels stored (K = {k_speed}) | {s_med:.0f} (rounds: {', '.join(f'{x:.0f}' for x in sto)}) |")
    lines.append(f"| stored / colocated, per round | {', '.join(f'{x:.2f}x' for x in ratios)} (median "
                 f"{statistics.median(ratios):.2f}x) |")
    lines.append("")
    lines.append(f"Labelling with cnn_l (K = {k_speed}) took {big_labels.wall_s:.0f} s; an epoch of the split costs "
                 f"{epoch_col:.1f} s with the teacher colocated and {epoch_sto:.1f} s with stored labels, so the "
                 f"labelling pays for itself after {break_even:.1f} student epochs (summed over every student "
                 "trained from the same labels).")
    text = "\n".join([f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load after: "
                      f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}; total {time.perf_counter() - t_all:.0f} s",
                      "", *rows, "", *lines])
    print(text)
    return text


if __name__ == "__main__":
    main()
