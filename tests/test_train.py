"""The training loop end to end: one process without Ray, and 2 Ray Train workers (DDP over gloo)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    assert {"kl", "lr", "images_per_s", "data_wait_s_per_step", "eval/agreement", "eval/teacher_top1",
            "train/teacher_agreement"} <= set(distill_log[-1])
    assert "train/teacher_agreement" not in teacher_log[-1]  # no teacher in a supervised stage
    again = run_job(spec, str(job), use_ray=False)
    assert again.skipped == ["teacher", "distill"]


def test_train_step_reports_agreement_with_the_teacher_on_the_batch() -> None:
    """``train/teacher_agreement``: the fraction of the batch where student and teacher pick the same class."""
    import contextlib

    import torch
    from torch import nn

    from kd_cluster.methods import build_method
    from kd_cluster.teacher import ColocatedTeacher
    from kd_cluster.train.loop import Normalizer, train_step

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    t_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    batch = {"image": torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8), "label": torch.arange(32) % 10,
             "index": torch.arange(32), "step": 0}
    norm = Normalizer([0.5], [0.5], False)
    kw = dict(net=student, method=build_method("funmatch", {}), norm=norm, device=cpu,
              autocast=contextlib.nullcontext())
    stats: dict = {}
    train_step(batch, 1.0, teacher=ColocatedTeacher(t_model, cpu), stats=stats, **kw)
    with torch.no_grad():
        x = norm(batch["image"])
        want = (student(x).argmax(1) == t_model(x).argmax(1)).float().mean()
    assert 0.0 < want < 1.0  # two random models agree on some samples, not all
    assert torch.equal(stats["train/teacher_agreement"], want)
    same: dict = {}
    train_step(batch, 1.0, teacher=ColocatedTeacher(student, cpu), stats=same, **kw)
    assert same["train/teacher_agreement"].item() == 1.0


def test_where_the_teacher_runs_does_not_change_the_run(tiny_job, tmp_path: Path) -> None:
    """The same fitnet stage (a regressor initialised by the method) with the teacher on the worker and with a
    pool the driver started beforehand (as Ray actors are) ends with identical weights, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from kd_cluster.models import build_model, save_weights
    from kd_cluster.teacher.remote import LocalPool, build_server, server_config
    from kd_cluster.train import LocalSession, plan_job, run_stage

    torch.manual_seed(7)
    weights = str(tmp_path / "teacher.safetensors")
    save_weights(build_model("cnn_s", num_classes=10, in_chans=1), weights)
    out = {}
    for placement in ("colocated", "actors"):
        job = tiny_job(f"where-{placement}", resources={"num_workers": 1}, stages=[],
                       teacher={"arch": "cnn_s", "weights": weights, "placement": placement},
                       method={"name": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2"},
                       schedule={"steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 4})
        (plan,) = plan_job(load_job(job), str(job))
        pools = None
        if placement == "actors":  # started before the stage, elsewhere: nothing of it is drawn in the stage
            t = plan.teacher
            pools = {"teacher": LocalPool([build_server(server_config(t, t.members[0]), torch.device("cpu"))])}
        run_stage(plan, LocalSession(), teacher_pools=pools)
        out[placement] = {f: load_file(str(tmp_path / "runs" / f"where-{placement}" / "main" / f))
                          for f in ("model.safetensors", "method.safetensors")}
    for f, tensors in out["colocated"].items():
        assert tensors.keys() == out["actors"][f].keys()
        assert all(torch.equal(v, out["actors"][f][k]) for k, v in tensors.items()), f


def test_no_ray_stage_error_stops_its_loader_processes(tiny_job, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage that fails stops its loader processes at once, even while its traceback is still held."""
    import multiprocessing

    from kd_cluster.cluster import run_job
    from kd_cluster.train import loop

    real = loop.train_step

    def failing(batch, *args, **kwargs):
        if batch["step"] == 3:
            raise RuntimeError("boom at step 3")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing)
    job = tiny_job("fails", resources={"num_workers": 1},
                   stages=[{"name": "teacher", "trains": "teacher",
                            "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0}}}])
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(RuntimeError, match="boom at step 3") as failure:
        run_job(load_job(job), str(job), use_ray=False)
    assert failure.traceback  # the frames (and the loader objects in them) are still referenced here
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert left == []


@contextlib.contextmanager
def _another_ray_instance() -> Iterator[None]:
    """A process that Ray's address discovery takes for the raylet of another Ray instance on this machine."""
    from ray._private.services import find_gcs_addresses

    proc = subprocess.Popen(["kdc-test-raylet", "-c", "import time; time.sleep(900)", "--gcs-address=127.0.0.1:9"],
                            executable=sys.executable)
    try:
        find_gcs_addresses.cache_clear()
        assert "127.0.0.1:9" in find_gcs_addresses() and len(find_gcs_addresses()) >= 2
        yield
    finally:
        proc.kill()
        proc.wait()
        find_gcs_addresses.cache_clear()


def _output_until(capfd: Any, line: str, timeout_s: float = 60.0) -> str:
    """What the process wrote (its own lines and those Ray forwards from the cluster) until ``line`` came,
    plus two seconds for lines of other processes still on their way."""
    text, deadline = "", time.monotonic() + timeout_s
    while line not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text += "".join(capfd.readouterr())
    time.sleep(2.0)
    return text + "".join(capfd.readouterr())


@pytest.mark.slow
def test_ray_two_workers_ddp(ray_cluster: str, tiny_job, tmp_path: Path, capfd: Any) -> None:
    """Two stages on 2 Ray Train workers. The run's output has no error-level line and no traceback, also
    with another Ray instance on the machine (Train's placement-group cleaner once crashed on "Found multiple
    active Ray instances"; its preemption watcher logged an `E` line at every stage)."""
    from kd_cluster.cluster import run_job

    job = tiny_job("ray2")
    with _another_ray_instance():
        capfd.readouterr()
        res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
        out = _output_until(capfd, "[distill] step 8/8")
    assert "[teacher] step 6/6" in out and "[distill] step 8/8" in out, f"progress lines missing:\n{out[-3000:]}"
    assert "Traceback" not in out, f"a traceback in the run's output:\n{out[-6000:]}"
    errors = [ln for ln in out.splitlines() if re.search(r"\[[\d\- :,]+ E \d+ \d+\]", ln)]  # Ray's glog format
    assert not errors, "error-level lines in the run's output:\n" + "\n".join(errors)
    assert set(res.stages) == {"teacher", "distill"}
    d = tmp_path / "runs" / "ray2" / "distill"
    latest = json.loads((d / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 8 and latest["world_size"] == 2
    step_dir = d / "checkpoints" / latest["dir"]
    assert {"state.pt", "rng.pt", "manifest.json"} == {p.name for p in step_dir.iterdir()}
    # the manifest verifies what the two workers' checkpoint holds: both files, by size and SHA-256
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["step"] == 8
    listed = manifest["files"]
    for name in ("state.pt", "rng.pt"):
        data = (step_dir / name).read_bytes()
        assert listed[name]["size"] == len(data) and listed[name]["sha256"] == hashlib.sha256(data).hexdigest()
    log = _metrics(tmp_path, "ray2", "distill")
    assert [m["step"] for m in log] == [2, 4, 6, 8]
    assert 0.0 <= log[-1]["eval/agreement"] <= 1.0


def _run_until(cmd: list[str], env: dict[str, str], metrics: Path, step: int, sig: int, timeout: float = 300) -> int:
    """Start ``cmd``; once its metrics log reaches ``step``, send ``sig`` to its process group; returns the exit code."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read().decode()[-2000:]}"
            if metrics.exists() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"step {step} not reached in {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
    return proc.wait(timeout=120)


def _final_weights(store_url: str, endpoint: str | None) -> dict:
    import fsspec
    from safetensors.torch import load

    from kd_cluster.storage import storage_options

    fs, path = fsspec.core.url_to_fs(store_url, **storage_options(store_url, endpoint))
    return load(fs.cat_file(path))


@pytest.mark.slow
def test_exact_resume_after_two_sigkills_on_s3(ray_cluster: str, s3, tiny_job, tmp_path: Path) -> None:
    """2 workers, shards, stored soft labels and checkpoints on the S3 server: a run SIGKILLed at two random steps
    and resumed ends with weights bitwise equal to an uninterrupted run; the resumed stream yields the same keys
    (and replays the same stored crops); the metric log's step axis has no repeats. The labels are made first, by
    2 Ray labelling workers."""
    import random

    import torch

    from kd_cluster.cluster import run_job
    from kd_cluster.cluster.labeling import label_job
    from kd_cluster.data import build_mnist5k
    from kd_cluster.models import build_model, save_weights
    from kd_cluster.storage import storage_options

    bucket = s3.bucket("exact")
    data = f"{bucket}/mnist5k"
    build_mnist5k(data, storage_options=storage_options(data, s3.endpoint), progress=False)
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher.safetensors")
    save_weights(build_model("cnn_s", num_classes=10, in_chans=1), teacher)
    sections = dict(stages=[], method={"name": "kd", "temperature": 4.0, "alpha": 0.5},
                    teacher={"arch": "cnn_s", "weights": teacher, "placement": "stored", "labels": f"{bucket}/labels"},
                    student={"arch": "cnn_m"},  # has dropout
                    data={"train": f"{data}/train", "val": f"{data}/val", "endpoint_url": s3.endpoint,
                          "image_size": 28, "batch_size": 32, "loader_workers": 1},
                    augment={"mixup_alpha": 0.0},
                    schedule={"steps": 48, "log_every": 2, "eval_every": 48, "checkpoint_every": 8, "warmup_steps": 4},
                    storage={"path": f"{bucket}/runs", "endpoint_url": s3.endpoint})
    ref_job, job = tiny_job("exact-ref", **sections), tiny_job("exact", **sections)
    made = label_job(load_job(ref_job), str(ref_job), views=2, top_k=3, use_ray=True, address=ray_cluster, workers=2,
                     progress=lambda s: None)
    assert made.shards_labelled == 16 and made.samples == 4000
    run_job(load_job(ref_job), str(ref_job), use_ray=True, address=ray_cluster)

    rng = random.Random()
    first = rng.randint(9, 22)
    second = rng.randint(first + 9, 38)  # at least one checkpoint after the first kill
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    cmd = [sys.executable, "-m", "kd_cluster.cli", "run", str(job)]
    metrics = tmp_path / "tel" / "metrics" / "exact" / "main.jsonl"
    for kill_at in (first, second):
        _run_until(cmd, env, metrics, kill_at, signal.SIGKILL)
    # the kill lands a poll interval after the log shows `second` (or the next log step): a checkpoint is
    # committed only after its step is logged, so the last logged step bounds the step the run resumes from
    last_logged = max(json.loads(x)["step"] for x in metrics.read_text().splitlines())
    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    assert 8 <= res.stages["main"]["resumed_from"] <= last_logged, (first, second, last_logged)

    ref = _final_weights(f"{bucket}/runs/exact-ref/main/model.safetensors", s3.endpoint)
    got = _final_weights(f"{bucket}/runs/exact/main/model.safetensors", s3.endpoint)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after kills at steps {first} and {second}"
    ref_log, log = _metrics(tmp_path, "exact-ref", "main"), _metrics(tmp_path, "exact", "main")
    assert [m["step"] for m in log] == list(range(2, 49, 2))  # no repeats, no gaps
    assert [m["data/keys_crc"] for m in log] == [m["data/keys_crc"] for m in ref_log]  # same samples per window
    assert [m["loss"] for m in log] == [m["loss"] for m in ref_log]


def test_sigterm_checkpoints_and_exits_then_resumes(tiny_job, tmp_path: Path) -> None:
    """One process: SIGTERM mid-run -> the step finishes, a checkpoint is written, exit code 143; the same
    command resumes from exactly that step."""
    from kd_cluster.storage import CheckpointStore, Store

    job = tiny_job("term", stages=[], teacher=None, method={"name": "supervised"}, resources={"num_workers": 1},
                   schedule={"steps": 60, "log_every": 1, "eval_every": 60, "checkpoint_every": 1000},
                   fault_tolerance={"check_every": 1})
    metrics = tmp_path / "tel" / "metrics" / "term" / "main.jsonl"
    cmd = [sys.executable, "-m", "kd_cluster.cli", "run", str(job), "--no-ray"]
    code = _run_until(cmd, dict(os.environ), metrics, 5, signal.SIGTERM)
    assert code == 143
    ckpts = CheckpointStore(Store(str(tmp_path / "runs" / "term" / "main")))
    saved = ckpts.latest()
    assert saved is not None and 5 <= saved < 60  # no periodic checkpoint before 1000: this one is the SIGTERM's
    assert max(m["step"] for m in _metrics(tmp_path, "term", "main")) <= saved + 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from checkpoint at step {saved}" in r.stdout


@pytest.mark.slow
def test_ray_worker_failure_is_one_clear_error(ray_cluster: str, tiny_job, tmp_path: Path) -> None:
    """A failure inside the workers (here: teacher weights that do not exist) names the stage and the cause."""
    from kd_cluster.cluster import StageFailed, run_job

    job = tiny_job("fails", stages=[], teacher={"arch": "cnn_s", "weights": str(tmp_path / "missing.safetensors")})
    with pytest.raises(StageFailed, match=r"stage 'main' of run 'fails'.*missing\.safetensors"):
        run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)


@pytest.mark.slow
def test_ray_worker_sigterm_checkpoints_and_restarts(ray_cluster: str, tiny_job, tmp_path: Path,
                                                      ray_train_worker_pids) -> None:
    """SIGTERM to the Ray Train workers (a spot reclaim): they checkpoint at the step they reached, Ray Train
    restarts them (fault_tolerance.max_failures) and the run resumes from that checkpoint and completes."""
    import threading

    from kd_cluster.cluster import run_job
    from kd_cluster.storage import CheckpointStore, Store

    job = tiny_job("rayterm", stages=[], teacher=None, method={"name": "supervised"},
                   schedule={"steps": 80, "log_every": 1, "eval_every": 80, "checkpoint_every": 1000},
                   fault_tolerance={"max_failures": 1, "check_every": 1})
    metrics = tmp_path / "tel" / "metrics" / "rayterm" / "main.jsonl"
    before = set(ray_train_worker_pids())
    sent: list[int] = []

    def preempt() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.exists() and any(json.loads(x)["step"] >= 10 for x in metrics.read_text().splitlines()):
                for pid in set(ray_train_worker_pids()) - before:
                    os.kill(pid, signal.SIGTERM)
                    sent.append(pid)
                return
            time.sleep(0.1)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    res = run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    t.join()
    assert sent, "no Ray Train worker found to preempt"
    resumed = res.stages["main"]["resumed_from"]
    assert 10 <= resumed < 80  # the preemption checkpoint (no periodic one before step 1000)
    committed = CheckpointStore(Store(str(tmp_path / "runs" / "rayterm" / "main"))).latest_info()["committed"]
    assert resumed in committed and 80 in committed
    assert [m["step"] for m in _metrics(tmp_path, "rayterm", "main")] == list(range(1, 81))
