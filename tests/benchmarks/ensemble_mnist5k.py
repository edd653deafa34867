"""A teacher ensemble against its members, on mnist5k: ``python tests/benchmarks/ensemble_mnist5k.py``.

For each seed, ``jobs/ensemble.yaml`` (two teachers of different architectures, cnn_m and cifar:resnet14, trained
as stages, then function matching into cnn_xs) runs in this process (``--no-ray``, one worker, the job's global
batch) with three more stages from the same student initialisation and data order: the same distillation from
each member alone, and the student trained from scratch on the labels. Prints, as mean ± std over the seeds with
every run listed: each teacher's and the ensemble's val top-1, and the student's top-1 after each distillation.

Options: ``--seeds`` (default 0 1 2), ``--steps`` (distillation steps, default: the job's), ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

JOB = Path(__file__).resolve().parents[2] / "jobs" / "ensemble.yaml"


def single(member: str) -> dict[str, Any]:
    """A stage that distills from one member alone (a one-member teacher)."""
    arch = {"cnn": "cnn_m", "resnet": "cifar:resnet14"}[member]
    return {"name": f"distill_{member}",
            "set": {"teacher": {"members": [{"name": member, "arch": arch, "weights": f"stage:teacher_{member}"}]}}}


def run_seed(seed: int, out: Path, steps: int | None) -> dict[str, float]:
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    overrides = [f"seed={seed}", f"name=ensemble-s{seed}", f"storage.path={out / 'runs'}", "resources.num_workers=1",
                 "telemetry.wandb_mode=disabled", f"telemetry.wandb_dir={out / 'tel' / 'wandb'}",
                 "telemetry.progress=false"]
    if steps:
        overrides.append(f"schedule.steps={steps}")
    spec = load_job(JOB, overrides)
    stages = [*spec.stages, *(type(spec.stages[0]).model_validate(single(m)) for m in ("cnn", "resnet")),
              type(spec.stages[0]).model_validate({"name": "scratch", "set": {"method": {"name": "supervised"},
                                                                          "augment": {"mixup_alpha": 0.0}}})]
    spec = spec.model_copy(update={"stages": stages})
    res = run_job(spec, str(JOB), use_ray=False).stages
    top1 = {name: st["final_metrics"]["eval/student_top1"] for name, st in res.items()}
    fm = res["distill"]["final_metrics"]
    return {"teacher cnn_m": top1["teacher_cnn"], "teacher cifar:resnet14": top1["teacher_resnet"],
            "ensemble (eval of the distill stage)": fm["eval/teacher_top1"],
            "student from scratch": top1["scratch"], "student from cnn_m": top1["distill_cnn"],
            "student from cifar:resnet14": top1["distill_resnet"], "student from the ensemble": top1["distill"]}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(a.out or tempfile.mkdtemp(prefix="kdc-ensemble-"))
    t0 = time.perf_counter()
    runs = {s: run_seed(s, out, a.steps) for s in a.seeds}
    wall = time.perf_counter() - t0
    rows = ["| model (val top-1, 1,000 digits) | mean ± std | " + " | ".join(f"seed {s}" for s in a.seeds) + " |",
            "|---|---|" + "---|" * len(a.seeds)]
    for key in runs[a.seeds[0]]:
        vals = [runs[s][key] for s in a.seeds]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(f"| {key} | {statistics.mean(vals):.4f} ± {sd:.4f} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    table = "\n".join(rows)
    print(f"jobs/ensemble.yaml, seeds {a.seeds}, --no-ray; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; total {wall:.0f} s\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
