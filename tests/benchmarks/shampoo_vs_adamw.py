"""Function matching on mnist5k with AdamW and with Shampoo, same teacher, steps, seed and schedule.

    .venv/bin/python tests/benchmarks/shampoo_vs_adamw.py [--steps 800] [--eval-every 100]

One job, three stages, in one process (no Ray): the demo's teacher (cnn_m), then the cnn_xs student
distilled twice, once per optimizer. Prints the student's val top-1 at every eval step as a markdown
table (the README's curves come from it).
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
    ap.add_argument("--work", default=None, help="folder of an earlier run of this script: resume it")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="kdc-shampoo-"))
    sched = {"steps": a.steps, "warmup_steps": a.steps // 20, "eval_every": a.eval_every, "log_every": a.eval_every,
             "checkpoint_every": a.steps}
    job = {
        "extends": str(ROOT / "jobs" / "demo.yaml"),
        "name": "shampoo-vs-adamw",
        "storage": {"path": str(work / "runs")},
        "telemetry": {"wandb_mode": "disabled", "wandb_dir": str(work / "wandb"), "progress": False},
        "schedule": sched,
        "stages": [
            {"name": "teacher", "trains": "teacher",
             "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 1.0},
                     "schedule": {"steps": 600, "warmup_steps": 40, "eval_every": 600, "checkpoint_every": 600}}},
            {"name": "adamw", "set": {"optimizer": {"name": "adamw", "lr": a.lr}}},
            {"name": "shampoo", "set": {"optimizer": {"name": "shampoo", "lr": a.lr,
                                                      "shampoo": {"block_size": 128, "update_every": 20,
                                                                  "start_step": 20, "graft": "rmsprop"}}}},
        ],
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
    print(f"function matching, cnn_m teacher (top-1 {res.stages['teacher']['final_metrics']['eval/student_top1']:.3f}) "
          f"-> cnn_xs, mnist5k val, {a.steps} steps, batch 128, peak lr {a.lr}, warm-up + cosine; "
          f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.0f} s")
    print("\n| step | AdamW top-1 | Shampoo top-1 |\n|---:|---:|---:|")
    for step in sorted(curves["adamw"]):
        print(f"| {step} | {curves['adamw'][step]:.3f} | {curves['shampoo'].get(step, float('nan')):.3f} |")
    for stage in ("adamw", "shampoo"):
        print(f"{stage}: {res.stages[stage]['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
