"""Every distillation method on mnist5k with one fixed budget: ``python tests/benchmarks/methods_mnist5k.py``.

One job, run with ``--no-ray`` in this process: a shared teacher stage (cnn_s, supervised), then one
stage per method, each training a fresh cnn_xs student from the same initialisation on the same data
order (same seed) for the same number of steps: from-scratch (supervised), kd, fitnet, at, pad, crd.
Prints a markdown table of the final student top-1 on the 1,000 validation digits.

Options: ``--steps`` (per method, default 300), ``--teacher-steps`` (default 300), ``--out`` (run folder,
default a fresh temporary one).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

METHODS: dict[str, dict[str, Any]] = {
    "scratch": {"name": "supervised"},
    "kd": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
    "fitnet": {"name": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2", "regressor": "conv_bn",
               "hint_weight": 100.0},
    "at": {"name": "at", "student_layers": ["stage1", "stage2", "stage3"],
           "teacher_layers": ["stage1", "stage2", "stage3"], "beta": 1000.0},
    "pad": {"name": "pad", "student_layer": "flatten", "teacher_layer": "flatten", "warmup_fraction": 0.1},
    "crd": {"name": "crd", "student_layer": "flatten", "teacher_layer": "flatten", "crd_weight": 0.8},
}


def job(out: Path, steps: int, teacher_steps: int) -> dict[str, Any]:
    """The benchmark job: teacher stage, then one stage per method."""
    stages = [{"name": "teacher", "trains": "teacher",
               "set": {"method": {"name": "supervised"}, "schedule": {"steps": teacher_steps}}}]
    stages += [{"name": name, "set": {"method": m}} for name, m in METHODS.items()]
    return {
        "name": "methods-mnist5k", "seed": 0,
        "teacher": {"arch": "cnn_s", "weights": "stage:teacher"},
        "student": {"arch": "cnn_xs"},
        "method": {"name": "supervised"},
        "data": {"train": "builtin://mnist5k/train", "val": "builtin://mnist5k/val", "image_size": 28,
                 "batch_size": 64, "loader_workers": 1},
        "augment": {"crop_scale": [0.7, 1.0], "crop_ratio": [0.8, 1.25], "flip": False, "eval_resize_ratio": 1.0},
        "schedule": {"steps": steps, "warmup_steps": 20, "decay": "cosine", "log_every": 50},
        "optimizer": {"name": "adamw", "lr": 0.006, "weight_decay": 0.0005, "grad_clip_norm": 5.0},
        "resources": {"num_workers": 1},
        "storage": {"path": str(out / "runs")},
        "telemetry": {"wandb_mode": "disabled", "wandb_dir": str(out / "tel" / "wandb"), "progress": False},
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    out = Path(a.out or tempfile.mkdtemp(prefix="kdc-methods-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "methods_mnist5k.yaml"
    path.write_text(yaml.safe_dump(job(out, a.steps, a.teacher_steps), sort_keys=False))
    t0 = time.perf_counter()
    res = run_job(load_job(path), str(path), use_ray=False)
    wall = time.perf_counter() - t0
    teacher = res.stages["teacher"]["final_metrics"].get("eval/student_top1", float("nan"))
    rows = ["| method | student top-1 | stage wall s |", "|---|---|---|"]
    for name in METHODS:
        st = res.stages[name]
        label = "from scratch (CE only)" if name == "scratch" else name
        rows.append(f"| {label} | {st['final_metrics']['eval/student_top1']:.3f} | {st['wall_s']:.0f} |")
    table = "\n".join(rows)
    print(f"teacher cnn_s: {a.teacher_steps} steps, top-1 {teacher:.3f}; student cnn_xs: {a.steps} steps per "
          f"method, batch 64, AdamW 0.006 cosine, seed 0; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; total {wall:.0f} s\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
