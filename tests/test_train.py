"""The training loop end to end: one process without Ray, and 2 Ray Train workers (DDP over gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_cluster.config import load_job


def _metrics(tmp_path: Path, run: str, stage: str) -> list[dict]:
    f = tmp_path / "tel" / "metrics" / run / f"{stage}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()]


def test_no_ray_stages_artifacts_and_skip(tiny_job, tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    job = tiny_job("local", resources={"num_workers": 1},
                   stages=[{"name": "teacher", "trains": "teacher",
                            "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0},
                                    "schedule": {"steps": 30, "log_every": 10, "eval_every": 30}}},
                           {"name": "distill"}])
    spec = load_job(job)
    res = run_job(spec, str(job), use_ray=False)
    assert set(res.stages) == {"teacher", "distill"} and not res.skipped
    stage_dir = tmp_path / "runs" / "local"
    for stage in ("teacher", "distill"):
        assert (stage_dir / stage / "model.safetensors").is_file()
        marker = json.loads((stage_dir / stage / "stage.json").read_text())
        assert marker["final_metrics"]["eval/student_top1"] > 0.0
    assert json.loads((stage_dir / "distill" / "checkpoints" / "latest.json").read_text())["step"] == 8
    teacher_log = _metrics(tmp_path, "local", "teacher")
    assert [m["step"] for m in teacher_log] == [10, 20, 30]
    assert teacher_log[-1]["ce"] < teacher_log[0]["ce"]  # it learns
    distill_log = _metrics(tmp_path, "local", "distill")
    assert {"kl", "lr", "images_per_s", "data_wait_s_per_step", "eval/agreement", "eval/teacher_top1"} <= set(distill_log[-1])
    again = run_job(spec, str(job), use_ray=False)
    assert again.skipped == ["teacher", "distill"]


@pytest.mark.slow
def test_ray_two_workers_ddp(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    job = tiny_job("ray2")
    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    assert set(res.stages) == {"teacher", "distill"}
    d = tmp_path / "runs" / "ray2" / "distill"
    ckpts = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert ckpts  # persisted through Ray Train
    ckpt = ckpts[-1]
    assert {"state.pt", "rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    log = _metrics(tmp_path, "ray2", "distill")
    assert [m["step"] for m in log] == [2, 4, 6, 8]
    assert 0.0 <= log[-1]["eval/agreement"] <= 1.0


@pytest.mark.slow
def test_ray_run_killed_midway_resumes_from_checkpoint(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    """SIGKILL the driver after its first checkpoint; the same command resumes, no step repeated or lost."""
    from kd_cluster.cluster import run_job

    job = tiny_job("resume", stages=[], teacher=None, method={"name": "supervised"},
                   schedule={"steps": 400, "log_every": 5, "eval_every": 400, "checkpoint_every": 10})
    stage = tmp_path / "runs" / "resume" / "main"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "kd_cluster.cli", "run", str(job)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        snapshot = stage / "checkpoint_manager_snapshot.json"  # Ray Train's record of reported checkpoints
        while time.time() < deadline and not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
            assert proc.poll() is None, "run ended before its first checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (stage / "stage.json").exists(), "the run finished before it could be stopped"
    killed_at = max(m["step"] for m in _metrics(tmp_path, "resume", "main"))
    assert killed_at < 400

    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    assert res.stages["main"]["steps"] == 400
    assert 10 <= res.stages["main"]["resumed_from"] <= killed_at
    steps = [m["step"] for m in _metrics(tmp_path, "resume", "main")]
    assert steps == list(range(5, 401, 5))  # continues; nothing repeated, nothing missing


@pytest.mark.slow
def test_ray_worker_failure_is_one_clear_error(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    """A failure inside the workers (here: teacher weights that do not exist) names the stage and the cause."""
    from kd_cluster.cluster import StageFailed, run_job

    job = tiny_job("fails", stages=[], teacher={"arch": "cnn_s", "weights": str(tmp_path / "missing.safetensors")})
    with pytest.raises(StageFailed, match=r"stage 'main' of run 'fails'.*missing\.safetensors"):
        run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
