"""The CIFAR-100 and ImageNet job files validate (as written and with their smoke profile), and every
method's smoke job trains on 2 Ray workers with the colocated teacher, its loss going down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_cluster.config import load_job
from kd_cluster.train import plan_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# the feature-method benchmark jobs (other files in these folders have their own tests)
FAMILY = [JOBS / f"{name}.yaml" for name in (
    "cifar100/kd", "cifar100/fitnet", "cifar100/fitnet_two_stage", "cifar100/at", "cifar100/pad", "cifar100/crd",
    "imagenet/kd", "imagenet/at", "imagenet/pad")]


def test_every_family_job_exists() -> None:
    assert all(p.is_file() for p in FAMILY)


@pytest.mark.parametrize("job", FAMILY, ids=lambda p: f"{p.parent.name}/{p.stem}")
@pytest.mark.parametrize("profile", [None, "smoke"])
def test_job_validates(job: Path, profile: str | None) -> None:
    spec = load_job(job, profile=profile)
    plans = plan_job(spec, str(job), check_data="local")  # s3:// manifests are not opened
    if profile is None:
        assert spec.teacher is not None and spec.teacher.weights.startswith("s3://")  # never from a hub
        assert all(p.trains == "student" for p in plans)
    else:
        assert spec.data.train == "builtin://mnist5k/train" and plans[0].trains == "teacher"
        assert all(p.total_steps <= 12 for p in plans)


def _losses(tel: Path, run: str, stage: str) -> list[float]:
    lines = (tel / "metrics" / run / f"{stage}.jsonl").read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if "loss" in m]


def _smoke(name: str, tmp: Path) -> tuple[Path, object]:
    job = JOBS / "cifar100" / f"{name}.yaml"
    return job, load_job(job, [f"storage.path={tmp / 'runs'}", f"telemetry.wandb_dir={tmp / 'tel' / 'wandb'}"],
                         profile="smoke")


@pytest.fixture(scope="module")
def smoke_teacher(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The smoke profiles' first stage (a supervised teacher), trained once on Ray and shared by the
    method tests below (each smoke job would otherwise train the very same teacher again)."""
    from kd_cluster.cluster import run_job

    tmp = tmp_path_factory.mktemp("smoke-teacher")
    job, spec = _smoke("kd", tmp)
    spec = spec.model_copy(update={"stages": [s for s in spec.stages if s.trains == "teacher"]})
    run_job(spec, str(job), use_ray=True, address=ray_cluster)
    return str(tmp / "runs" / spec.name / "teacher" / "model.safetensors")


SMOKE = [pytest.param(name, placement, id=f"{name}-{placement}")
         for placement in ("colocated", "actors")
         for name in ("kd", "fitnet", "fitnet_two_stage", "at", "pad", "crd")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "placement"), SMOKE)
def test_smoke_job_on_two_ray_workers(ray_cluster: str, smoke_teacher: str, tmp_path: Path, name: str,
                                      placement: str) -> None:
    """With the teacher on each worker, and on one teacher actor returning the features the method asks for."""
    from kd_cluster.cluster import run_job

    job, spec = _smoke(name, tmp_path)
    assert spec.resources.num_workers == 2 and spec.stages[0].trains == "teacher"
    # the smoke job's own stages after its teacher stage, with the shared teacher
    teacher = spec.teacher.model_copy(update={"weights": smoke_teacher, "placement": placement, "replicas": 1,
                                              "num_cpus": 1.0})
    spec = spec.model_copy(update={"stages": spec.stages[1:], "teacher": teacher})
    res = run_job(spec, str(job), use_ray=True, address=ray_cluster)
    assert res.stages[spec.stages[-1].name]["steps"] == spec.schedule.steps
    for stage in [s.name for s in spec.stages]:
        log = [json.loads(line) for line in
               (tmp_path / "tel" / "metrics" / spec.name / f"{stage}.jsonl").read_text().splitlines()]
        # CRD's own term cannot fall within a few steps: a positive's bank row is random until its sample
        # is seen a second time (12 x 32 of 4,000 samples here); its label term must
        key = "ce" if name == "crd" else "loss"
        losses = [m[key] for m in log if key in m]
        assert len(losses) >= 2 and losses[-1] < losses[0], (stage, key, losses)
        assert all(v == v for m in log for v in m.values() if isinstance(v, float))  # no NaN
