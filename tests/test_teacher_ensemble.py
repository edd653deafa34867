"""Teacher ensembles: the probability average, the same outputs whichever placement builds the members, the
job-file rules, a whole job (two teachers trained as stages, then distilled), and a member actor killed mid-run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_cluster.config import SpecError, load_job
from kd_cluster.data import mixup
from kd_cluster.methods import build_method
from kd_cluster.models import Normalizer, build_model, save_weights
from kd_cluster.teacher import (EnsembleTeacher, MemberPlan, StepInput, TeacherContext, TeacherPlan, TeacherView,
                                build_teacher)
from kd_cluster.teacher.ensemble import combine
from kd_cluster.train import plan_job

CPU = torch.device("cpu")
MEAN, STD = (0.5,), (0.25,)


def test_combine_is_the_log_of_the_weighted_mean_of_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    out = combine([a, b], [1.0, 3.0])
    want = 0.25 * torch.softmax(a, 1) + 0.75 * torch.softmax(b, 1)
    assert torch.allclose(out.exp(), want, atol=1e-6)
    assert torch.allclose(torch.softmax(out, 1), want, atol=1e-6)  # a softmax of it gives the average back
    assert torch.equal(combine([a], [2.0]), torch.log(torch.softmax(a, 1)))


def _plan(tmp_path: Path, placement: str, method: str, view: str, taps: tuple[str, ...]) -> TeacherPlan:
    members = []
    for i, (name, arch) in enumerate((("wide", "cnn_s"), ("small", "cnn_xs"))):
        torch.manual_seed(10 + i)
        path = tmp_path / f"{name}.safetensors"
        if not path.exists():
            save_weights(build_model(arch, num_classes=10, in_chans=1), str(path))
        members.append(MemberPlan(name=name, arch=arch, weights=str(path), weight=1.0 + i,
                                  taps=taps if name == "wide" else ()))
    return TeacherPlan(placement=placement, members=tuple(members), view=view, num_classes=10, channels=1,  # type: ignore[arg-type]
                       mean=MEAN, std=STD, endpoint_url=None, method_name=method, prefetch=1)


@pytest.mark.parametrize("method,view,taps", [("funmatch", "same", ()), ("fixed_teacher", "center", ("stage2",)),
                                              ("independent_views", "independent", ()), ("sskd", "same", ("pool",))])
def test_ensemble_outputs_are_identical_colocated_and_on_actors_fp32(tmp_path: Path, method: str, view: str,
                                                                     taps: tuple[str, ...]) -> None:
    m = build_method(method, {})
    norm = Normalizer(list(MEAN), list(STD), False)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (6, 1, 28, 28), generator=g, dtype=torch.uint8), "step": 5,
             "label": torch.arange(6), "key": [str(i) for i in range(6)], "corrupt": 0}
    if view != "same":
        batch["image_t"] = torch.randint(0, 256, (6, 1, 28, 28), generator=g, dtype=torch.uint8)
    lam = 1.0 if method == "sskd" else 0.6
    outs = {}
    for placement in ("colocated", "actors"):
        teacher = build_teacher(_plan(tmp_path, placement, method, view, taps),
                                TeacherContext(device=CPU, rank=0, amp=None, channels_last=False, expand=m.expand))
        assert isinstance(teacher, EnsembleTeacher) and teacher.member_names == ("wide", "small")
        fed = next(iter(teacher.feed(iter([dict(batch)]), lambda s: lam)))
        x = m.expand(mixup(norm(fed["image"]), lam) if lam < 1 else norm(fed["image"]))
        logits, feats = teacher.step(StepInput(fed, x, lam, TeacherView(view, m.expand, norm), CPU))  # type: ignore[arg-type]
        ev = teacher.evaluate(norm(batch["image"]), batch["image"])
        outs[placement] = (logits, feats, ev, teacher.metrics(), "image_t" in fed)
        teacher.close()
    (cl, cf, ce, cm, c_view), (al, af, ae, am, a_view) = outs["colocated"], outs["actors"]
    assert cl.shape == ((24, 10) if method == "sskd" else (6, 10))
    assert torch.equal(cl, al) and set(cf) == set(af) == set(taps)
    assert all(torch.equal(cf[k], af[k]) for k in cf)
    assert torch.equal(ce.logits, ae.logits) and all(torch.equal(ce.members[k], ae.members[k]) for k in ce.members)
    assert torch.equal(ce.logits, combine([ce.members["wide"], ce.members["small"]], [1.0, 2.0]))
    assert cm["teacher/wide/agreement"] == am["teacher/wide/agreement"]
    assert 0.0 <= cm["teacher/small/agreement"] <= 1.0
    assert "teacher/wide/latency_p50_s" in am  # each member pool's own figures
    assert c_view == (view != "same") and not a_view  # the second view went to the actors, not to the device


ENSEMBLE = {  # (arch and weights null: the tiny job's single teacher is replaced)
    "arch": None, "weights": None, "placement": "colocated",
    "members": [{"name": "wide", "arch": "cnn_s", "weights": "stage:teacher_wide"},
                {"name": "deep", "arch": "cnn_m", "weights": "stage:teacher_deep", "weight": 2.0}],
}
TEACHER_STAGES = [
    {"name": "teacher_wide", "trains": "teacher", "member": "wide",
     "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0}, "schedule": {"steps": 6}}},
    {"name": "teacher_deep", "trains": "teacher", "member": "deep",
     "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0}, "schedule": {"steps": 6}}},
    {"name": "distill"},
]


def _errors(tiny_job: Any, **sections: Any) -> str:
    job = tiny_job("bad", **sections)
    with pytest.raises(SpecError) as exc:
        plan_job(load_job(job), str(job), check_data="none")
    return str(exc.value)


def test_ensemble_job_file_rules(tiny_job: Any) -> None:
    both = _errors(tiny_job, teacher={**ENSEMBLE, "arch": "cnn_s"}, stages=TEACHER_STAGES)
    assert "teacher" in both and "either arch/weights (one teacher) or members" in both
    dup = _errors(tiny_job, teacher={**ENSEMBLE, "members": [{"arch": "cnn_s"}, {"arch": "cnn_s"}]})
    assert "duplicate member names ['cnn_s']" in dup
    missing = _errors(tiny_job, teacher=ENSEMBLE, stages=[{**TEACHER_STAGES[0], "member": None}, *TEACHER_STAGES[1:]])
    assert "stages[0] (teacher_wide): member: a stage that trains an ensemble teacher names the member" in missing
    feats = _errors(tiny_job, teacher=ENSEMBLE, stages=TEACHER_STAGES,
                    method={"name": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2"})
    assert "reads teacher features: with an ensemble teacher, set teacher.features_from" in feats
    wrong_from = _errors(tiny_job, teacher={**ENSEMBLE, "features_from": "nope"}, stages=TEACHER_STAGES)
    assert "features_from: 'nope' is not a member" in wrong_from
    taps = _errors(tiny_job, teacher={**ENSEMBLE, "features_from": "deep"}, stages=TEACHER_STAGES,
                   method={"name": "fitnet", "student_layer": "stage2", "teacher_layer": "layer9"})
    assert "teacher member 'deep' feature taps" in taps and "layer9" in taps
    job = tiny_job("ok", teacher={**ENSEMBLE, "features_from": "deep"}, stages=TEACHER_STAGES,
                   method={"name": "fitnet", "student_layer": "stage2", "teacher_layer": "stage2"})
    plans = plan_job(load_job(job), str(job), check_data="none")
    assert [p.arch for p in plans] == ["cnn_s", "cnn_m", "cnn_xs"]
    t = plans[-1].teacher
    assert t is not None and [(m.name, m.weight, m.taps) for m in t.members] == [
        ("wide", 1.0, ()), ("deep", 2.0, ("stage2",))]
    assert t.members[0].weights.endswith("ok/teacher_wide/model.safetensors")
    assert plans[-1].teacher_arch == "cnn_s+cnn_m"


def test_a_local_ray_instance_is_sized_for_the_largest_stage(tiny_job: Any) -> None:
    """Ray cannot grow a started local instance: it must fit the job's largest stage, not its first one."""
    from kd_cluster.cluster.driver import stage_cpus

    job = tiny_job("sz", teacher={**ENSEMBLE, "placement": "actors", "num_cpus": 0.5,
                                  "members": [{**ENSEMBLE["members"][0], "replicas": 3},
                                              {**ENSEMBLE["members"][1], "num_cpus": 2}]}, stages=TEACHER_STAGES)
    plans = plan_job(load_job(job), str(job), check_data="none")
    # 2 workers x 1 CPU; + 3 replicas x 0.5 CPU (-> 2) + 1 replica x 2 CPUs for the distillation
    assert [stage_cpus(p) for p in plans] == [2, 2, 6]


def test_ensemble_job_trains_its_members_as_stages_then_distills(tiny_job: Any, tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    job = tiny_job("ens", resources={"num_workers": 1}, teacher=ENSEMBLE, stages=TEACHER_STAGES,
                   method={"name": "kd"})
    res = run_job(load_job(job), str(job), use_ray=False)
    assert list(res.stages) == ["teacher_wide", "teacher_deep", "distill"]
    assert res.stages["teacher_deep"]["arch"] == "cnn_m"
    log = [json.loads(x) for x in (tmp_path / "tel" / "metrics" / "ens" / "distill.jsonl").read_text().splitlines()]
    last = log[-1]
    for name in ("wide", "deep"):
        assert 0.0 <= last[f"teacher/{name}/agreement"] <= 1.0
        assert 0.0 <= last[f"eval/teacher/{name}_top1"] <= 1.0
    final = res.stages["distill"]["final_metrics"]
    assert final["eval/teacher_top1"] == last["eval/teacher_top1"]


@pytest.mark.slow
def test_ray_ensemble_member_actor_killed_mid_run_every_step_once(ray_cluster: str, tiny_job: Any,
                                                                   tmp_path: Path) -> None:
    import ray

    from kd_cluster.cluster import run_job
    from kd_cluster.cluster.teacher_pool import actor_name

    weights = {}
    for i, (name, arch) in enumerate((("wide", "cnn_s"), ("small", "cnn_xs"))):
        torch.manual_seed(i)
        weights[name] = str(tmp_path / f"{name}.safetensors")
        save_weights(build_model(arch, num_classes=10, in_chans=1), weights[name])
    teacher = {"arch": None, "weights": None, "placement": "actors", "num_cpus": 0.5, "prefetch": 2, "max_restarts": 2, "request_timeout_s": 60,
               "members": [{"name": "wide", "arch": "cnn_s", "weights": weights["wide"]},
                           {"name": "small", "arch": "cnn_xs", "weights": weights["small"], "replicas": 2}]}
    job = tiny_job("enskill", resources={"num_workers": 1}, teacher=teacher, stages=[],
                   schedule={"steps": 30, "warmup_steps": 2, "log_every": 2, "eval_every": 30, "checkpoint_every": 30})
    metrics = tmp_path / "tel" / "metrics" / "enskill" / "main.jsonl"
    killed: list[str] = []

    def killer() -> None:  # waits on the run's progress, not on the clock
        while not killed and th_stop.is_set() is False:
            if metrics.exists() and any(json.loads(x)["step"] >= 6 for x in metrics.read_text().splitlines()):
                handle = ray.get_actor(actor_name("enskill", "main", 0, "small"))
                killed.append(handle._actor_id.hex())
                ray.kill(handle, no_restart=False)  # Ray restarts it; its requests in flight are lost
                return
            time.sleep(0.05)

    th_stop = threading.Event()
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    finally:
        th_stop.set()
        th.join(5)
    assert killed, "the member's teacher actor was never killed"
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in log] == list(range(2, 31, 2))  # every log step, once
    assert log[-1]["teacher/small/restarts"] == 1 and log[-1]["teacher/wide/restarts"] == 0
    assert all(m["loss"] == m["loss"] for m in log)  # no NaN
    assert 0.0 <= log[-1]["eval/teacher/small_top1"] <= 1.0
