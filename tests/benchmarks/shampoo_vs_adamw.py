"""Function matching with AdamW and with Shampoo, same teacher, steps, seed and schedule.

    .venv/bin/python tests/benchmarks/shampoo_vs_adamw.py [--steps 800] [--eval-every 100]
    .venv/bin/python tests/benchmarks/shampoo_vs_adamw.py --dataset fashion-mnist [--teacher-weights URI]

One job in one process (no Ray): a cnn_m teacher trained as its first stage (or loaded from
``--teacher-weights``, e.g. the model.safetensors of `kd-cluster bench fidelity`'s teacher), then the cnn_xs
student distilled twice, once per optimizer. mnist5k: the demo's job (teacher 600 steps, mixup 1.0);
fashion-mnist: jobs/fashion_mnist/funmatch.yaml (teacher as jobs/fashion_mnist/teacher.yaml, 3,000 steps).
Prints the student's val top-1 at every eval step as a markdown table (the README's curves come from it).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import yaml

from kd_cluster.cluster import run_job
from kd_cluster.config import load_job

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.006, help="peak LR of both optimizers")
    ap.add_argument("--work", default=None, help="working folder; an earlier run's folder resumes that run")
    ap.add_argument("--dataset", choices=("mnist5k", "fashion-mnist"), default="mnist5k")
    ap.add_argument("--teacher-weights", default=None, help="a trained cnn_m teacher (any fsspec URI): no teacher "
                    "stage")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="kdc-shampoo-"))
    work.mkdir(parents=True, exist_ok=True)  # a new --work folder is made; an earlier run's is resumed
    sched = {"steps": a.steps, "warmup_steps": a.steps // 20, "eval_every": a.eval_every, "log_every": a.eval_every,
             "checkpoint_every": a.steps}
    if a.dataset == "mnist5k":
        base, teacher = ROOT / "jobs" / "demo.yaml", {"mixup_alpha": 1.0, "steps": 600}
    else:
        base, teacher = ROOT / "jobs" / "fashion_mnist" / "funmatch.yaml", {"mixup_alpha": 0.2, "steps": 3000}
    stages = [
        {"name": "adamw", "set": {"optimizer": {"name": "adamw", "lr": a.lr}}},
        {"name": "shampoo", "set": {"optimizer": {"name": "shampoo", "lr": a.lr,
                                                  "shampoo": {"block_size": 128, "update_every": 20,
                                                              "start_step": 20, "graft": "rmsprop"}}}},
    ]
    if a.teacher_weights is None:
        n = teacher["steps"]
        stages.insert(0, {"name": "teacher", "trains": "teacher",
                          "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": teacher["mixup_alpha"]},
                                  "schedule": {"steps": n, "warmup_steps": n // 15 if n < 1000 else n // 20,
                                               "eval_every": n, "checkpoint_every": n}}})
    job = {
        "extends": str(base),
        "name": "shampoo-vs-adamw",
        "seed": 0,
        "teacher": {"arch": "cnn_m", "weights": a.teacher_weights or "stage:teacher"},
        "storage": {"path": str(work / "runs")},
        "telemetry": {"wandb_mode": "disabled", "wandb_dir": str(work / "wandb"), "progress": False},
        "schedule": sched,
        "stages": stages,
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    t0 = time.perf_counter()
    res = run_job(load_job(path), str(path), use_ray=False)
    curves = {}
    for stage in ("adamw", "shampoo"):
        log = work / "metrics" / "shampoo-vs-adamw" / f"{stage}.jsonl"
        curves[stage] = {m["step"]: m["eval/student_top1"] for m in map(json.loads, log.read_text().splitlines())
                         if "eval/student_top1" in m}
    t_top1 = (f"top-1 {res.stages['teacher']['final_metrics']['eval/student_top1']:.3f}" if "teacher" in res.stages
              else f"from {a.teacher_weights}")
    print(f"function matching, cnn_m teacher ({t_top1}) -> cnn_xs, {a.dataset} val, {a.steps} steps, batch 128, peak lr {a.lr}, warm-up + cosine; "
          f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.0f} s")
    print("\n| step | AdamW top-1 | Shampoo top-1 |\n|---:|---:|---:|")
    for step in sorted(curves["adamw"]):
        print(f"| {step} | {curves['adamw'][step]:.3f} | {curves['shampoo'].get(step, float('nan')):.3f} |")
    for stage in ("adamw", "shampoo"):
        print(f"{stage}: {res.stages[stage]['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
