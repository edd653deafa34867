"""The SSKD / IE-KD / IE-DML / DML job files: their smoke profiles plan on this code base, and the full
recipes validate wherever the CIFAR model family and the multistep LR decay they use are available."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_cluster.config import load_job
from kd_cluster.config.spec import ScheduleSpec
from kd_cluster.models import ModelError, check_model_name

JOBS = Path(__file__).resolve().parents[1] / "jobs"
FILES = ["cifar100/sskd.yaml", "cifar100/ie_kd.yaml", "cifar100/ie_dml.yaml", "cifar100/dml.yaml", "imagenet/sskd.yaml"]


def _missing_for(name: str) -> str | None:
    """Why the full recipe of job ``name`` cannot be validated here, or None."""
    if name.startswith("cifar100/"):
        try:
            check_model_name("resnet8x4")
            check_model_name("resnet32x4")
        except ModelError:
            return "CIFAR models not registered (resnet8x4, resnet32x4)"
    if "multistep" not in str(ScheduleSpec.model_fields["decay"].annotation):
        return "multistep LR decay not available"
    return None


@pytest.mark.parametrize("name", FILES)
def test_smoke_profile_plans(name: str) -> None:
    from kd_cluster.train import plan_job

    spec = load_job(JOBS / name, profile="smoke")
    plans = plan_job(spec, name, check_data="none")
    assert plans[-1].spec.data.train == "builtin://mnist5k/train"
    assert all(p.spec.augment.mixup_alpha == 0.0 for p in plans)
    assert all(p.spec.schedule.decay == "cosine" for p in plans)


@pytest.mark.parametrize("name", FILES)
def test_full_recipe_validates(name: str) -> None:
    from kd_cluster.train import plan_job

    reason = _missing_for(name)
    if reason:
        pytest.skip(reason)
    plans = plan_job(load_job(JOBS / name), name, check_data="none")
    assert plans[-1].spec.schedule.decay == "multistep"
