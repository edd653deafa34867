"""The multistep LR decay: gamma at each milestone, milestones in epochs or steps, checked in the spec."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kd_cluster.config import ScheduleSpec
from kd_cluster.optim import lr_factor, milestone_steps


def test_multistep_factor_drops_by_gamma_at_each_milestone() -> None:
    ms = [10, 20, 30]
    got = [lr_factor(s, 40, 0, "multistep", ms, 0.1) for s in (0, 9, 10, 19, 20, 29, 30, 39)]
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert lr_factor(1, 40, 4, "multistep", ms, 0.1) == pytest.approx(0.5)  # warm-up first


def test_milestones_in_epochs_become_steps() -> None:
    spec = ScheduleSpec(epochs=240, decay="multistep", milestones=[150, 180, 210])
    # CIFAR-100: 50,000 images, batch 64 -> 781.25 steps per epoch
    assert milestone_steps(spec, 50_000, 64) == [117188, 140625, 164062]
    spec = ScheduleSpec(steps=100, decay="multistep", milestones=[30, 60], milestone_unit="steps")
    assert milestone_steps(spec, 50_000, 64) == [30, 60]


@pytest.mark.parametrize(("kw", "msg"), [
    ({"decay": "multistep"}, "needs milestones"),
    ({"decay": "multistep", "milestones": [20, 10]}, "increasing"),
    ({"decay": "cosine", "milestones": [10]}, "only with decay: multistep"),
])
def test_bad_milestones_are_spec_errors(kw: dict, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        ScheduleSpec(steps=100, **kw)
