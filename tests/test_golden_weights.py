"""Refactor guard: fixed jobs end with recorded final weights, bit for bit.

Four short distillations (kd with the teacher colocated, funmatch with teacher actors, fitnet colocated, at with
teacher actors) after a teacher stage, run in one process (``--no-ray``); then kd and at with teacher actors
again on 2 Ray Train workers (DDP) and a Ray actor pool, from the teacher the first run trained.
The SHA-256 of every stage's final weights (student, and the method's own modules) was recorded before the
training loop was restructured; any change to what the loop computes shows up here as a changed hash.

Float results depend on the CPU's instruction set and the math libraries' code paths, so the jobs run in a
subprocess with those pinned to their portable baseline (one thread, no AVX in ATen, SSE4.1 in oneDNN, MKL's
compatible mode), and hashes are recorded per torch version and CPU. On a platform without a record the test
says so and skips: record with ``python tests/test_golden_weights.py --record`` on a commit known to be good.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

RECORD = Path(__file__).with_name("golden_weights.json")

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

JOB: dict[str, Any] = {
    "name": "golden",
    "seed": 3,
    "teacher": {"arch": "cnn_s", "weights": "stage:teacher"},
    "student": {"arch": "cnn_xs"},
    "method": {"name": "kd"},
    "data": {"train": "builtin://mnist5k/train", "val": "builtin://mnist5k/val", "image_size": 28,
             "batch_size": 32, "loader_workers": 1},
    "augment": {"crop_scale": [0.5, 1.0], "flip": False, "mixup_alpha": 1.0, "eval_resize_ratio": 1.0},
    "schedule": {"steps": 6, "warmup_steps": 2, "log_every": 3, "eval_every": 6, "checkpoint_every": 4},
    "optimizer": {"name": "adamw", "lr": 0.003, "grad_clip_norm": 5.0},
    "resources": {"num_workers": 2},
    "telemetry": {"wandb_mode": "disabled", "progress": False},
    "stages": [
        {"name": "teacher", "trains": "teacher",
         "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0}, "schedule": {"steps": 8}}},
        {"name": "kd"},
        {"name": "funmatch_actors", "set": {"method": {"name": "funmatch"}, "teacher": {"placement": "actors"}}},
        {"name": "fitnet", "set": {"method": {"name": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2"}}},
        {"name": "at_actors", "set": {"method": {"name": "at", "student_layers": ["stage2", "stage3"],
                                                 "teacher_layers": ["stage2", "stage3"]},
                                      "teacher": {"placement": "actors"}}},
    ],
}


def platform_key() -> str:
    """torch version and CPU model: what the recorded hashes are valid for."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"torch {torch.__version__} | {cpu}"


def weights_digest(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors (names, dtypes, shapes, bytes), independent of file layout."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


RAY_STAGES = ("kd", "at_actors")  # the second needs more CPUs than the first: the local Ray instance must fit it


def run_golden(work: Path, ray: bool) -> dict[str, str]:
    """Run the golden job in a subprocess with pinned numerics; the digest of every stage's weights.

    The Ray run (after the local one) takes the local run's teacher and runs only ``RAY_STAGES``: each Ray
    stage costs a Ray Train start-up."""
    job = copy.deepcopy(JOB)
    mode = "ray" if ray else "local"
    if ray:
        job["teacher"]["weights"] = str(work / "local" / "runs" / JOB["name"] / "teacher" / "model.safetensors")
        job["stages"] = [next(s for s in JOB["stages"] if s["name"] == name) for name in RAY_STAGES]
    job["storage"] = {"path": str(work / mode / "runs")}
    job["telemetry"]["wandb_dir"] = str(work / mode / "tel" / "wandb")
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"golden-{mode}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, **PINNED_ENV}
    cmd = [sys.executable, "-m", "kd_cluster.cli", "run", str(path)] + ([] if ray else ["--no-ray"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"golden job ({mode}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = {}
    for stage in (s["name"] for s in job["stages"]):
        d = work / mode / "runs" / JOB["name"] / stage
        out[f"{mode}/{stage}/model"] = weights_digest(d / "model.safetensors")
        if (d / "method.safetensors").exists():
            out[f"{mode}/{stage}/method"] = weights_digest(d / "method.safetensors")
    return out


@pytest.mark.slow
def test_final_weights_of_fixed_jobs_are_unchanged(tmp_path: Path) -> None:
    records = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    want = records.get(platform_key())
    if want is None:
        pytest.skip(f"no recorded hashes for {platform_key()!r} (recorded: {sorted(records)}); record them on a "
                    "commit known to be good with `python tests/test_golden_weights.py --record`")
    got = run_golden(tmp_path, ray=False) | run_golden(tmp_path, ray=True)
    changed = sorted(k for k in want if got.get(k) != want[k])
    assert not changed, f"final weights changed for {changed}"
    assert set(got) == set(want)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Compute (and with --record, store) the golden final-weight hashes.")
    p.add_argument("--record", action="store_true")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    import tempfile

    work = Path(a.work or tempfile.mkdtemp(prefix="kdc-golden-"))
    got: dict[str, str] = {}
    for ray in (False, True):
        got |= run_golden(work, ray)
    print(json.dumps(got, indent=1))
    if a.record:
        records = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        records[platform_key()] = got
        RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"recorded under {platform_key()!r} in {RECORD}")
