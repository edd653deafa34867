"""SSKD, IE-KD / IE-DML and DML end to end on mnist5k with 2 Ray Train workers: every stage runs, the
method's modules are published, and a re-run resumes from the checkpoint with the method's state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_cluster.config import load_job

pytestmark = pytest.mark.slow

NO_MIX = {"mixup_alpha": 0.0}
SHORT = {"steps": 4, "warmup_steps": 0, "log_every": 2, "eval_every": 4, "checkpoint_every": 2}


def _metrics(tmp_path: Path, run: str, stage: str) -> list[dict]:
    f = tmp_path / "tel" / "metrics" / run / f"{stage}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()]


def _rerun_last_stage(job: Path, ray_cluster: str, root: Path, stage: str, before: list[str],
                      overrides: list[str] | None = None) -> dict:
    """Forget that ``stage`` finished (its marker and artifacts) and run the job again: it must skip the
    stages before it and resume ``stage`` from its last checkpoint."""
    from kd_cluster.cluster import run_job

    for name in ("stage.json", "method.safetensors", "model.safetensors"):
        (root / stage / name).unlink()
    res = run_job(load_job(job, overrides), str(job), use_ray=True, address=ray_cluster)
    assert res.skipped == before
    return res.stages[stage]


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ray_sskd_stages_and_resume(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    job = tiny_job("sskd", augment=NO_MIX, schedule=SHORT, stages=[
        {"name": "teacher", "trains": "teacher", "set": {"method": {"name": "supervised"}, "schedule": {"steps": 6}}},
        {"name": "head", "set": {"method": {"name": "sskd", "phase": "head"}}},
        {"name": "student", "set": {"method": {"name": "sskd", "init": "stage:head"}}},
    ])
    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    assert list(res.stages) == ["teacher", "head", "student"]
    root = tmp_path / "runs" / "sskd"
    head = load_file(root / "head" / "method.safetensors")
    assert {k.split(".")[0] for k in head} == {"t_head"}
    student = load_file(root / "student" / "method.safetensors")
    assert {k.split(".")[0] for k in student} == {"t_head", "s_head"}
    assert all(torch.equal(student[k], head[k]) for k in head)  # the teacher's head: loaded and frozen
    log = _metrics(tmp_path, "sskd", "student")
    assert {"ce", "kd", "tf", "ss", "ss_student_top1", "eval/student_top1"} <= set(log[-1])
    assert "ss_head_top1" in _metrics(tmp_path, "sskd", "head")[-1]

    again = _rerun_last_stage(job, ray_cluster, root, "student", ["teacher", "head"])
    assert again["resumed_from"] == 4
    assert _same_tensors(load_file(root / "student" / "method.safetensors"), student)  # heads from the checkpoint


def test_ray_ie_kd_and_ie_dml_stages_and_resume(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    """The IE-KD stages (teacher, auto-encoder, student) run in this process: Ray adds nothing to what they
    check. Only the IE-DML stage, whose peer and auto-encoders are DDP-trained by 2 Ray workers and restored
    from their checkpoint, runs on the cluster: two Ray fits instead of five."""
    from kd_cluster.cluster import run_job

    ie = {"name": "ie_kd", "teacher_layer": "stage3", "student_layer": "stage3"}
    ie_kd_stages = [
        {"name": "teacher", "trains": "teacher", "set": {"method": {"name": "supervised"}, "schedule": {"steps": 6}}},
        {"name": "autoencoder", "set": {"method": {**ie, "phase": "autoencoder"}}},
        {"name": "student", "set": {"method": {**ie, "variant": "ft", "init": "stage:autoencoder"}}},
    ]
    first = tiny_job("ie", augment=NO_MIX, schedule=SHORT, stages=ie_kd_stages)
    res = run_job(load_job(first), str(first), use_ray=False)
    assert list(res.stages) == ["teacher", "autoencoder", "student"]
    root = tmp_path / "runs" / "ie"
    ae = load_file(root / "autoencoder" / "method.safetensors")
    student = load_file(root / "student" / "method.safetensors")
    assert {k.split(".")[0] for k in student} == {"teacher_ae", "explorer"}
    assert all(torch.equal(student[k], ae[k]) for k in ae)  # the auto-encoder: loaded and frozen (BN stats too)
    assert {"ce", "inh", "exp"} <= set(_metrics(tmp_path, "ie", "student")[-1])

    job = tiny_job("ie", augment=NO_MIX, schedule=SHORT, stages=[
        *ie_kd_stages, {"name": "iedml", "set": {"method": {"name": "ie_dml", "peer_arch": "cnn_xs", "variant": "od"}}},
    ])
    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    assert res.skipped == ["teacher", "autoencoder", "student"] and list(res.stages)[-1] == "iedml"
    dml_log = _metrics(tmp_path, "ie", "iedml")[-1]
    assert {"ce", "kl", "inh", "exp", "rec", "peer_ce", "peer_kl", "peer_inh", "peer_exp", "peer_rec",
            "peer_train_top1"} <= set(dml_log)
    iedml = load_file(root / "iedml" / "method.safetensors")

    again = _rerun_last_stage(job, ray_cluster, root, "iedml", ["teacher", "autoencoder", "student"])
    assert again["resumed_from"] == 4
    assert _same_tensors(load_file(root / "iedml" / "method.safetensors"), iedml)  # peer + auto-encoders restored


def test_ray_dml_peers_train_checkpoint_and_resume(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    job = tiny_job("dml", stages=[], teacher=None, method={"name": "dml", "peers": ["cnn_xs"]}, schedule=SHORT)
    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    root = tmp_path / "runs" / "dml"
    peers = load_file(root / "main" / "method.safetensors")
    assert any(k.startswith("peers.0.") for k in peers)
    log = _metrics(tmp_path, "dml", "main")
    assert {"ce", "kl", "peer1_ce", "peer1_kl", "peer1_train_top1"} <= set(log[-1])
    assert res.stages["main"]["steps"] == 4

    # the stage resumes at its final checkpoint with the peer as it was ...
    again = _rerun_last_stage(job, ray_cluster, root, "main", [])
    assert again["resumed_from"] == 4
    assert _same_tensors(load_file(root / "main" / "method.safetensors"), peers)
    # ... and continues from there when given more steps
    more = _rerun_last_stage(job, ray_cluster, root, "main", [], ["schedule.steps=8"])
    assert more["resumed_from"] == 4 and more["steps"] == 8
    assert [m["step"] for m in _metrics(tmp_path, "dml", "main")] == [2, 4, 6, 8]
    assert not _same_tensors(load_file(root / "main" / "method.safetensors"), peers)  # the peer trained on


def test_ray_dml_killed_midway_resumes_with_its_peer(ray_cluster: str, tiny_job, tmp_path: Path,
                                                     ray_train_worker_pids) -> None:
    """SIGKILL the driver after its first checkpoint; the same command resumes student and peer, no step
    repeated or lost, and the peer's loss goes on from where it was rather than from a fresh network's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from kd_cluster.cluster import run_job

    job = tiny_job("dmlkill", stages=[], teacher=None, method={"name": "dml", "peers": ["cnn_xs"]},
                   augment=NO_MIX, optimizer={"name": "adamw", "lr": 0.01}, schedule={"steps": 200, "warmup_steps": 0, "log_every": 5, "eval_every": 200,
                                             "checkpoint_every": 10})
    stage = tmp_path / "runs" / "dmlkill" / "main"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "kd_cluster.cli", "run", str(job)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        latest = stage / "checkpoints" / "latest.json"  # written when the first checkpoint is complete
        while time.time() < deadline and not latest.exists():
            assert proc.poll() is None, "run ended before its first checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The driver is gone, but its Ray Train workers outlive it for a moment: Ray stops them with SIGTERM, and
    # they write a preemption checkpoint at their next check step (a newer resume point, as it should be).
    # Only when they have exited is the last committed checkpoint final.
    gone = time.time() + 120
    while ray_train_worker_pids() and time.time() < gone:
        time.sleep(0.2)
    assert not ray_train_worker_pids(), "the killed driver's Ray Train workers still run after 120 s"
    assert not (stage / "stage.json").exists(), "the run finished before it could be stopped"
    # the last committed checkpoint: the resume point. (Not the metrics file's last step: a checkpoint can be
    # committed a moment before the same step's metrics reach the disk, and the kill can fall in between.)
    committed = json.loads(latest.read_text())["step"]

    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    resumed = res.stages["main"]["resumed_from"]
    assert 10 <= resumed == committed < 200
    log = _metrics(tmp_path, "dmlkill", "main")
    assert [m["step"] for m in log] == list(range(5, 201, 5))  # nothing repeated, nothing missing
    first_after = next(m for m in log if m["step"] > resumed)
    # the peer resumed trained: a fresh one would start again near ln(10) = 2.30, like the first log window
    assert first_after["peer1_ce"] < log[0]["peer1_ce"] - 0.1
