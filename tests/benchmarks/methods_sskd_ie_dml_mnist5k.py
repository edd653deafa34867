"""SSKD, IE-KD, IE-DML and DML next to KD and the from-scratch student on mnist5k, under one fixed budget.

One job, run in this process without Ray (``--no-ray``): a ``cnn_m`` teacher is trained as the first
stage; then every method trains the same ``cnn_xs`` student for the same number of steps, batch and
seed (SSKD's head and IE-KD's auto-encoder get their own short stages on the frozen teacher; DML and
IE-DML train a ``cnn_m`` peer from scratch alongside the student). Prints a markdown table.

    python tests/benchmarks/methods_sskd_ie_dml_mnist5k.py [--steps 100] [--teacher-steps 150] [--aux-steps 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml


def job(steps: int, teacher_steps: int, aux_steps: int, seed: int, root: Path) -> dict:
    ie = {"name": "ie_kd", "teacher_layer": "stage3", "student_layer": "stage3"}
    return {
        "name": "methods-bench",
        "seed": seed,
        "teacher": {"arch": "cnn_m", "weights": "stage:teacher"},
        "student": {"arch": "cnn_xs"},
        "method": {"name": "supervised"},
        "data": {"train": "builtin://mnist5k/train", "val": "builtin://mnist5k/val", "image_size": 28,
                 "batch_size": 64, "loader_workers": 1},
        "augment": {"crop_scale": [0.7, 1.0], "crop_ratio": [0.8, 1.25], "flip": False, "mixup_alpha": 0.0,
                    "eval_resize_ratio": 1.0},
        "schedule": {"steps": steps, "warmup_steps": 10, "log_every": 50, "eval_every": steps,
                     "checkpoint_every": steps},
        "optimizer": {"name": "adamw", "lr": 0.006, "weight_decay": 0.0005, "grad_clip_norm": 5.0},
        "resources": {"num_workers": 1},
        "storage": {"path": str(root / "runs")},
        "telemetry": {"wandb_mode": "disabled", "progress": False, "wandb_dir": str(root / "tel" / "wandb")},
        "stages": [
            {"name": "teacher", "trains": "teacher",
             "set": {"method": {"name": "supervised"}, "schedule": {"steps": teacher_steps, "eval_every": teacher_steps,
                                                                     "checkpoint_every": teacher_steps}}},
            {"name": "scratch", "set": {"method": {"name": "supervised"}}},
            {"name": "kd", "set": {"method": {"name": "kd"}}},
            {"name": "sskd-head", "set": {"method": {"name": "sskd", "phase": "head"},
                                          "schedule": {"steps": aux_steps, "eval_every": aux_steps,
                                                       "checkpoint_every": aux_steps}}},
            {"name": "sskd", "set": {"method": {"name": "sskd", "init": "stage:sskd-head"}}},
            {"name": "ie-autoencoder", "set": {"method": {**ie, "phase": "autoencoder"},
                                               "schedule": {"steps": aux_steps, "eval_every": aux_steps,
                                                            "checkpoint_every": aux_steps}}},
            {"name": "ie-kd", "set": {"method": {**ie, "variant": "at", "init": "stage:ie-autoencoder"}}},
            {"name": "ie-dml", "set": {"method": {"name": "ie_dml", "peer_arch": "cnn_m", "variant": "at"}}},
            {"name": "dml", "set": {"method": {"name": "dml", "peers": ["cnn_m"]}}},
        ],
    }


ROWS = [("from scratch (supervised)", "scratch"), ("KD (T=4, alpha=0.9)", "kd"), ("SSKD", "sskd"),
        ("IE-KD (IE-AT)", "ie-kd"), ("IE-DML (IE-AT, cnn_m peer)", "ie-dml"), ("DML (cnn_m peer)", "dml")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="steps of every student stage")
    ap.add_argument("--teacher-steps", type=int, default=150)
    ap.add_argument("--aux-steps", type=int, default=30, help="steps of the SSKD head and IE auto-encoder stages")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        path = root / "bench.yaml"
        path.write_text(yaml.safe_dump(job(args.steps, args.teacher_steps, args.aux_steps, args.seed, root)))
        t0 = time.perf_counter()
        res = run_job(load_job(path), str(path), use_ray=False)
        total = time.perf_counter() - t0
    st = res.stages
    teacher = st["teacher"]["final_metrics"]["eval/student_top1"]
    print(f"\nmnist5k, student cnn_xs, teacher cnn_m ({args.teacher_steps} steps, val top-1 {teacher:.4f}); "
          f"{args.steps} steps per student, batch 64, AdamW lr 0.006 cosine, no mixup, seed {args.seed}; "
          f"SSKD head / IE auto-encoder {args.aux_steps} steps; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, no Ray, one process; {total:.0f} s in all\n")
    print("| method | student top-1 | stage wall s |")
    print("|---|---|---|")
    for label, stage in ROWS:
        m = st[stage]["final_metrics"]
        print(f"| {label} | {m['eval/student_top1']:.4f} | {st[stage]['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
