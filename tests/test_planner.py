"""kd-cluster plan: the split of N GPUs between training workers and teacher actors, on made-up rates."""

from __future__ import annotations

import json

import pytest

from kd_cluster.bench.planner import Rates, candidates, plan


def test_colocated_wins_when_sharing_a_gpu_costs_nothing_extra() -> None:
    # S 1000, T 500: colocated C = 1/(1/1000 + 1/500) = 333.3 per GPU, 2666.7 on 8;
    # splits min(1000 W, 500 (8 - W)): W=2 -> 2000, W=3 -> 2500 (best split), W=4 -> 2000
    r = Rates(student=1000, teacher=500)
    cands = {(c.workers, c.teacher_gpus): c.images_per_s for c in candidates(r, 8)}
    assert cands[(8, 0)] == pytest.approx(8000 / 3)
    assert cands[(3, 5)] == pytest.approx(2500) and cands[(2, 6)] == pytest.approx(2000)
    p = plan(r, 8, samples=1_281_167)
    assert (p.best.workers, p.best.teacher_gpus, p.best.bound) == (8, 0, "colocated")
    assert p.epoch_s == pytest.approx(1_281_167 / (8000 / 3))


def test_a_split_wins_when_the_measured_colocated_rate_is_worse_than_time_sharing() -> None:
    p = plan(Rates(student=1000, teacher=500, colocated=250), 8)  # 2000 colocated
    assert (p.best.workers, p.best.teacher_gpus, p.best.placement) == (3, 5, "actors")
    assert p.best.images_per_s == pytest.approx(2500) and p.best.bound == "teacher"


def test_gpu_decode_costs_the_workers_gpu_time_and_loader_cores_follow_the_rate() -> None:
    # G 2000: a worker's student rate 1/(1/1000 + 1/2000) = 666.7; W=4: min(2666.7, 4 x 500 = 2000)
    r = Rates(student=1000, teacher=500, colocated=250, gpu_decode=2000, decode_per_core=400)
    p = plan(r, 8, decode="gpu")
    assert (p.best.workers, p.best.teacher_gpus) == (4, 4) and p.best.images_per_s == pytest.approx(2000)
    assert p.cores_per_worker == 2  # 500 images/s per worker / 400 per core -> 2 cores
    assert not p.notes
    assert plan(Rates(student=1000, teacher=500), 8, decode="gpu").notes  # G unknown: said so


def test_too_few_loader_cores_cap_every_candidate() -> None:
    p = plan(Rates(student=1000, teacher=500, decode_per_core=100), 8, cpus=16)  # 1600 images/s at most
    assert p.best.images_per_s == pytest.approx(1600) and p.best.bound == "data"
    assert p.best.teacher_gpus == 0  # ties go to fewer teacher GPUs


def test_one_gpu_and_bad_rates() -> None:
    assert [(c.workers, c.teacher_gpus) for c in candidates(Rates(100, 100), 1)] == [(1, 0)]
    with pytest.raises(ValueError, match="teacher"):
        Rates(student=100, teacher=0)
    with pytest.raises(ValueError, match="--gpus"):
        plan(Rates(100, 100), 0)


def test_plan_command_prints_the_split_for_a_job(capsys: pytest.CaptureFixture[str]) -> None:
    from kd_cluster.cli import main

    rc = main(["plan", "jobs/bench/gpu_r152_r50.yaml", "--gpus", "8", "--rates", "1000,500,250", "--samples",
               "1281167", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert (res["workers"], res["teacher_gpus"], res["placement"]) == (3, 5, "actors")
    assert "resources.num_workers=3 teacher.placement=actors teacher.replicas=5" in out
    assert res["epoch_s"] == pytest.approx(1281167 / 2500)
    assert main(["plan", "jobs/bench/gpu_r152_r50.yaml", "--gpus", "8", "--rates", "1000"]) == 2
    assert "--rates" in capsys.readouterr().err
