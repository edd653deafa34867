"""Stored soft labels: labelling (resumable, each shard once), the stream replaying the labelled crops, the
stored teacher's distributions, the job-file rules, and a run with placement stored end to end."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kd_cluster.config import SpecError, load_job
from kd_cluster.data import AugmentParams, TrainStream, load_manifest, read_labels, write_split
from kd_cluster.data.soft_labels import StoredViews, pick_view, read_sidecar
from kd_cluster.models import build_model, save_weights
from kd_cluster.teacher.stored import dense_distribution
from kd_cluster.train import plan_job


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 real digits in 4 shards (a small split labels in seconds)."""
    import io

    from PIL import Image

    from kd_cluster.data.writer import load_mnist5k_arrays

    images, labels = load_mnist5k_arrays()
    out = str(tmp_path_factory.mktemp("digits"))

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    for split, sl in (("train", slice(0, 200)), ("val", slice(200, 300))):
        write_split(((png(images[i]), "png", int(labels[i])) for i in range(5000)[sl]), out, name="digits",
                    split=split, classes=[str(d) for d in range(10)], channels=1, shard_size=50, progress=False)
    return out


def _job(tmp_path: Path, data: str, weights: str, **over: Any) -> dict[str, Any]:
    job = {
        "name": "st", "seed": 3,
        "teacher": {"arch": "cnn_s", "weights": weights, "placement": "stored", "labels": str(tmp_path / "labels")},
        "student": {"arch": "cnn_xs"},
        "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
        "data": {"train": f"{data}/train", "val": f"{data}/val", "image_size": 24, "batch_size": 16,
                 "loader_workers": 1},
        "augment": {"crop_scale": [0.5, 1.0], "flip": True, "eval_resize_ratio": 1.0},
        "schedule": {"steps": 6, "log_every": 2, "eval_every": 6, "checkpoint_every": 3},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "resources": {"num_workers": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "telemetry": {"wandb_mode": "disabled", "wandb_dir": str(tmp_path / "tel" / "wandb"), "progress": False},
    }
    for k, v in over.items():
        job[k] = {**job[k], **v} if isinstance(v, dict) and isinstance(job.get(k), dict) else v
    return job


def _write(tmp_path: Path, job: dict[str, Any], name: str = "st.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(job))
    return p


@pytest.fixture
def labelled(tmp_path: Path, small_data: str) -> tuple[Path, Any]:
    """A teacher's weights and its labels (K = 3, top-4) over the small split; returns (job file, label result)."""
    from kd_cluster.cluster.labeling import label_job

    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.safetensors")
    save_weights(build_model("cnn_s", num_classes=10, in_chans=1), weights)
    path = _write(tmp_path, _job(tmp_path, small_data, weights))
    res = label_job(load_job(path), str(path), views=3, top_k=4, use_ray=False, progress=lambda s: None)
    return path, res


def test_dense_distribution_keeps_the_top_n_and_spreads_the_rest_evenly() -> None:
    probs = torch.tensor([[0.5, 0.3], [0.9, 0.1]], dtype=torch.float16)
    classes = torch.tensor([[2, 0], [1, 3]])
    p = dense_distribution(probs, classes, 4)
    assert torch.allclose(p[0], torch.tensor([0.3, 0.1, 0.5, 0.1]), atol=1e-3)  # fp16 storage
    assert torch.allclose(p[1], torch.tensor([0.0, 0.9, 0.0, 0.1]), atol=1e-3)  # nothing left to spread
    assert torch.allclose(p.sum(1), torch.ones(2), atol=1e-3)
    full = dense_distribution(torch.tensor([[0.6, 0.4]]), torch.tensor([[1, 0]]), 2)  # N = C
    assert torch.allclose(full, torch.tensor([[0.4, 0.6]]))


def test_labels_hold_the_teachers_top_n_on_the_crops_the_stream_replays(labelled: tuple[Path, Any]) -> None:
    """The stream's uint8 crop of a sample is the labelled view it picked, and the stored top-N are the teacher's
    top-N on exactly that crop."""
    from kd_cluster.models import Normalizer, load_weights

    path, res = labelled
    spec = load_job(path)
    labels = res.labels
    assert res.shards_labelled == 4 and res.samples == 200
    assert (labels.config.views, labels.config.top_k, labels.config.data_shards) == (3, 4, [50, 50, 50, 50])
    side = read_sidecar(labels.files[0])
    assert side["boxes"].shape == (50, 3, 4) and side["probs"].dtype == np.float16
    assert side["classes"].dtype == np.int16 and side["valid"].all()
    manifest = load_manifest(spec.data.train)
    aug = AugmentParams(image_size=24, crop_scale=(0.5, 1.0), flip=True, eval_resize_ratio=1.0, channels=1)
    stream = TrainStream(manifest, batch_size=16, seed=spec.seed, rank=0, world_size=1, num_workers=0, start_step=0,
                         augment=aug, stored=StoredViews(labels, seed=spec.seed))
    teacher = build_model("cnn_s", num_classes=10, in_chans=1)
    load_weights(teacher, spec.teacher.weights)
    teacher.eval()
    norm = Normalizer([0.5], [0.5], False)
    assert {pick_view(spec.seed, 0, 0, p, 3) for p in range(50)} == {0, 1, 2}  # every stored view gets replayed
    for _, batch in zip(range(14), stream):  # 14 x 16 = 224 > 200 samples: into the second pass
        with torch.no_grad():
            top = torch.softmax(teacher(norm(batch["image"])), 1).topk(4, dim=1)
        assert torch.allclose(batch["soft_probs"].float(), top.values, atol=2e-3)  # fp16
        assert torch.equal(batch["soft_classes"][:, :2], top.indices[:, :2])  # the clear leaders, at least
    # a pure function of the step: a stream restarted at step 9 yields the same batches
    again = TrainStream(manifest, batch_size=16, seed=spec.seed, rank=0, world_size=1, num_workers=0, start_step=9,
                        augment=aug, stored=StoredViews(labels, seed=spec.seed))
    first = next(iter(again))
    ref = next(b for i, b in zip(range(10), TrainStream(
        manifest, batch_size=16, seed=spec.seed, rank=0, world_size=1, num_workers=0, start_step=0, augment=aug,
        stored=StoredViews(labels, seed=spec.seed))) if i == 9)
    assert torch.equal(first["image"], ref["image"]) and torch.equal(first["soft_probs"], ref["soft_probs"])


def test_a_run_with_stored_labels_trains_without_a_teacher_network(labelled: tuple[Path, Any], tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    path, _ = labelled
    res = run_job(load_job(path), str(path), use_ray=False)
    final = res.stages["main"]["final_metrics"]
    assert "eval/student_top1" in final and "eval/teacher_top1" not in final  # no teacher for val images
    log = [json.loads(x) for x in (tmp_path / "tel" / "metrics" / "st" / "main.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [2, 4, 6]
    assert all(0.0 <= m["train/teacher_agreement"] <= 1.0 and m["kl"] > 0 for m in log)


def _error(path: Path, overrides: list[str] | None = None, job: dict | None = None) -> str:
    if job is not None:
        path.write_text(yaml.safe_dump(job))
    with pytest.raises(SpecError) as exc:
        plan_job(load_job(path, overrides), str(path), check_data="local")
    return str(exc.value)


def test_stored_labels_are_refused_where_they_cannot_serve(labelled: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = labelled
    job = yaml.safe_load(path.read_text())
    other = tmp_path / "other.yaml"
    fm = _error(other, job={**job, "method": {"name": "funmatch"}})
    assert fm.count("\n  - ") == 1 and ("teacher.placement: stored cannot serve method 'funmatch': function matching "
                                        "trains on the teacher's prediction for the very image") in fm
    for name, why in (("dkd", "DKD needs every class's teacher logit"), ("dist", "DIST correlates the student's "
                                                                             "prediction with the teacher's over every class")):
        err = _error(other, job={**job, "method": {"name": name}})  # top-k labels cannot serve them
        assert err.count("\n  - ") == 1 and (f"teacher.placement: stored top-N probabilities cannot serve method "
                                              f"'{name}': {why}") in err and "teacher label --logits" in err, err
    feats = _error(other, job={**job, "method": {"name": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2"}})
    assert "stored labels hold the teacher's top-N probabilities, not the features" in feats
    mix = _error(path, ["augment.mixup_alpha=0.4"])
    assert "augment.mixup_alpha: method 'kd' wants the teacher's prediction on the mixed image" in mix
    other.write_text(yaml.safe_dump({**job, "method": {"name": "fixed_teacher"},
                                     "augment": {**job["augment"], "mixup_alpha": 0.4}}))
    plan_job(load_job(other), str(other), check_data="local")  # it mixes the stored targets itself: allowed
    mismatch = _error(path, ["teacher.arch=cnn_m", "data.image_size=28", "augment.crop_scale=[0.3,1.0]"])
    assert "teacher.arch: the labels at" in mismatch and "made by teacher cnn_s, this job's teacher is cnn_m" in mismatch
    assert "data.image_size: the labels at" in mismatch and "made with 24, this job has 28" in mismatch
    assert "augment.crop_scale: the labels at" in mismatch
    torch.manual_seed(1)
    other_w = str(tmp_path / "other.safetensors")
    save_weights(build_model("cnn_s", num_classes=10, in_chans=1), other_w)
    assert "teacher.weights: the labels at" in _error(path, [f"teacher.weights={other_w}"])
    missing = _error(path, [f"teacher.labels={tmp_path / 'nowhere'}"])
    assert "teacher.labels: no soft labels at" in missing and "kd-cluster teacher label" in missing
    no_labels = _error(other, job={**job, "teacher": {**job["teacher"], "labels": None}})
    assert "placement stored replays stored soft labels: set labels" in no_labels


def test_an_interrupted_labelling_resumes_and_writes_each_shard_once(tmp_path: Path, small_data: str) -> None:
    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.safetensors")
    save_weights(build_model("cnn_m", num_classes=10, in_chans=1), weights)  # slow enough to be caught midway
    path = _write(tmp_path, _job(tmp_path, small_data, weights, teacher={"arch": "cnn_m"}))
    out = tmp_path / "labels"
    cmd = [sys.executable, "-m", "kd_cluster.cli", "teacher", "label", str(path), "--views", "8", "--top-k", "2",
           "--no-ray", "--batch", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while len(list(out.glob("*.safetensors"))) < 1:  # waits on progress, not on the clock
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert 1 <= len(first) < 4 and not (out / "labels.json").exists()
    with pytest.raises(SpecError, match="no soft labels at .* did not finish"):
        plan_job(load_job(path), str(path), check_data="local")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(first)} were already done" in r.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert len(after) == 4 and all(after[n] == t for n, t in first.items())  # the finished ones were not rewritten
    assert read_labels(str(out)).config.views == 8
    other = [sys.executable, "-m", "kd_cluster.cli", "teacher", "label", str(path), "--views", "5", "--top-k", "2",
             "--no-ray"]
    again = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "holds labels of another configuration (differs in views)" in again.stderr


def test_full_logit_labels_replay_the_teacher_s_logits_and_serve_dkd(tmp_path: Path, small_data: str) -> None:
    """teacher label --logits stores every class's logit per view (float16): the stored teacher hands the method
    the teacher's logits on the replayed crop, a labelling stage with logits: true feeds DKD, DIST and KD (not
    function matching), and its label set takes K * (9 + 2 C) + 9 bytes per sample."""
    from kd_cluster.cluster import run_job
    from kd_cluster.cluster.labeling import label_job
    from kd_cluster.models import Normalizer, load_weights
    from kd_cluster.teacher.stored import StoredTeacher

    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.safetensors")
    save_weights(build_model("cnn_s", num_classes=10, in_chans=1), weights)
    path = _write(tmp_path, _job(tmp_path, small_data, weights))
    res = label_job(load_job(path), str(path), views=2, use_ray=False, logits=True, progress=lambda s: None)
    cfg = res.labels.config
    assert cfg.form == "logits" and res.labels.url.endswith("labels.json")
    side = read_sidecar(res.labels.files[0])
    assert side["logits"].shape == (50, 2, 10) and side["logits"].dtype == np.float16 and "probs" not in side
    assert sum(a.nbytes for a in side.values()) == 50 * (2 * (9 + 2 * 10) + 9)  # the file adds a small header
    spec = load_job(path)
    manifest = load_manifest(spec.data.train)
    aug = AugmentParams(image_size=24, crop_scale=(0.5, 1.0), flip=True, eval_resize_ratio=1.0, channels=1)
    stream = TrainStream(manifest, batch_size=16, seed=spec.seed, rank=0, world_size=1, num_workers=0, start_step=0,
                         augment=aug, stored=StoredViews(res.labels, seed=spec.seed))
    teacher = build_model("cnn_s", num_classes=10, in_chans=1)
    load_weights(teacher, weights)
    teacher.eval()
    norm = Normalizer([0.5], [0.5], False)
    plan = next(p for p in plan_job(spec, str(path), check_data="local") if p.teacher is not None)
    stored = StoredTeacher(plan.teacher, torch.device("cpu"))
    from kd_cluster.teacher.base import StepInput, TeacherView

    view = TeacherView("same", lambda x: x, norm)
    for _, batch in zip(range(3), stream):
        assert "soft_logits" in batch and "soft_probs" not in batch
        with torch.no_grad():
            live = teacher(norm(batch["image"]))
        replayed, _ = stored.step(StepInput(batch, norm(batch["image"]), 1.0, view, torch.device("cpu")))
        assert torch.allclose(replayed, live, atol=2e-2, rtol=1e-3)  # float16 storage
    # a job that labels in a stage with logits: true, then distills with DKD (and DIST) from the stored logits
    stages = [{"name": "label", "labels": {"views": 2, "logits": True}},
              {"name": "dkd", "set": {"method": {"name": "dkd", "warmup_fraction": 0.0},
                                      "teacher": {"placement": "stored", "labels": "stage:label"}}},
              {"name": "dist", "set": {"method": {"name": "dist"},
                                       "teacher": {"placement": "stored", "labels": "stage:label"}}},
              {"name": "kd", "set": {"method": {"name": "kd"},
                                     "teacher": {"placement": "stored", "labels": "stage:label"}}}]
    job = _job(tmp_path, small_data, weights, name="lg", stages=stages)
    job["teacher"] = {"arch": "cnn_s", "weights": weights}
    lg = _write(tmp_path, job, "lg.yaml")
    out = run_job(load_job(lg), str(lg), use_ray=False)
    assert out.stages["dkd"]["final_metrics"]["nckd"] > 0 and out.stages["dist"]["final_metrics"]["inter"] > 0
    assert out.stages["kd"]["final_metrics"]["kl"] > 0
    fm = _write(tmp_path, {**job, "stages": [stages[0], {"name": "fm", "set": {
        "method": {"name": "funmatch"}, "augment": {"mixup_alpha": 0.0},
        "teacher": {"placement": "stored", "labels": "stage:label"}}}]}, "fm.yaml")
    assert "stored cannot serve method 'funmatch'" in _error(fm)  # every logit, but of crops fixed in advance
    topk = _write(tmp_path, {**job, "stages": [{**stages[0], "labels": {"views": 2}}, stages[1]]}, "tk.yaml")
    err = _error(topk)
    assert "stages[1] (dkd): teacher.placement: stored top-N probabilities cannot serve method 'dkd'" in err, err
