"""The method life cycle the loop drives: feature taps, setup from a probe, method-only stages,
method modules published per stage and loaded by a later stage (``method.init: stage:<name>``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kd_cluster.config import SpecError, load_job
from kd_cluster.methods import METHODS, Method, MethodConfig, Needs, SetupInfo, StepOutputs


class ProbeHintConfig(MethodConfig):
    student_layer: str = "stage2"
    teacher_layer: str = "stage2"
    train_student: bool = True

    def needs(self) -> Needs:
        return Needs(teacher=True, student=self.train_student, index=True,
                     student_features=(self.student_layer,) if self.train_student else (),
                     teacher_features=(self.teacher_layer,))


class ProbeHint(Method):
    """A test method: 1x1 regressor from a student tap to a teacher tap; counts the samples it saw."""

    Config = ProbeHintConfig
    seen_setup: list[tuple] = []

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        t = probe.teacher_features[self.cfg.teacher_layer]
        # cnn_xs's stage2 has half the channels of cnn_s's; the head stage regresses from every other teacher channel
        c_in = probe.student_features[self.cfg.student_layer].shape[1] if self.cfg.train_student else t.shape[1] // 2
        self.reg = nn.Conv2d(c_in, t.shape[1], 1)
        self.register_buffer("seen", torch.zeros(info.num_samples))
        ProbeHint.seen_setup.append((tuple(t.shape), info.num_samples, info.num_classes))

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        t = out.teacher_features[self.cfg.teacher_layer]
        s = out.student_features[self.cfg.student_layer] if self.cfg.train_student else t[:, ::2]
        assert out.index is not None and out.index.shape[0] == out.labels.shape[0]
        self.seen[out.index] += 1
        return {"hint": (self.reg(s) - t).pow(2).mean()}


@pytest.fixture
def probe_hint():
    METHODS["probe_hint"] = ProbeHint
    ProbeHint.seen_setup.clear()
    yield
    del METHODS["probe_hint"]


def test_method_modules_trained_published_and_reused(probe_hint, tiny_job, tmp_path: Path) -> None:
    from kd_cluster.cluster import run_job

    stages = [
        {"name": "teacher", "trains": "teacher",
         "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0}, "schedule": {"steps": 6}}},
        # trains only the method's regressor on the frozen teacher
        {"name": "head", "set": {"method": {"name": "probe_hint", "train_student": False}}},
        # student + regressor, the regressor starting from the head stage's
        {"name": "hint", "set": {"method": {"name": "probe_hint", "init": "stage:head"}}},
    ]
    job = tiny_job("iface", resources={"num_workers": 1}, stages=stages)
    run_job(load_job(job), str(job), use_ray=False)
    root = tmp_path / "runs" / "iface"
    head = load_file(root / "head" / "method.safetensors")
    assert set(head) == {"reg.weight", "reg.bias", "seen"}
    assert head["seen"].sum().item() == 8 * 32  # every sample of every step, by its dataset index
    hint = load_file(root / "hint" / "method.safetensors")
    assert hint["reg.weight"].shape == head["reg.weight"].shape
    assert hint["seen"].sum().item() == 2 * 8 * 32  # started from the head stage's buffer
    assert not torch.equal(hint["reg.weight"], head["reg.weight"])  # and trained further
    # setup saw the teacher's real stage2 shape at 28 px and the train split's size
    shape, n, classes = ProbeHint.seen_setup[0]
    assert shape[1] > 1 and n == 4000 and classes == 10
    marker = json.loads((root / "head" / "stage.json").read_text())
    assert "eval/student_top1" not in marker["final_metrics"] and "eval/teacher_top1" in marker["final_metrics"]


def test_wrong_tap_is_a_spec_error_listing_names(probe_hint, tiny_job) -> None:
    from kd_cluster.train import plan_job

    job = tiny_job("badtap", method={"name": "probe_hint", "student_layer": "stage7"})
    with pytest.raises(SpecError, match=r"student feature taps: unknown feature tap 'stage7'.*close matches: stage3, stage2, stage1"):
        plan_job(load_job(job), str(job), check_data="none")


def test_method_init_must_name_an_earlier_stage(probe_hint, tiny_job) -> None:
    from kd_cluster.train import plan_job

    job = tiny_job("badinit", stages=[{"name": "teacher", "trains": "teacher",
                                       "set": {"method": {"name": "supervised"}}},
                                      {"name": "d", "set": {"method": {"name": "probe_hint", "init": "stage:nope"}}}])
    with pytest.raises(SpecError, match=r"method.init: 'stage:nope' names no earlier stage"):
        plan_job(load_job(job), str(job), check_data="none")


TOY_METHOD = '''"""A toy method, to show that a method is one file: squared distance between softened outputs."""

from __future__ import annotations

from pydantic import Field

from kd_cluster.methods.base import F, Method, MethodConfig, Needs, StepOutputs, register, torch


class ToyConfig(MethodConfig):
    """Settings of ``toy_l2``: loss = weight * mean((p_s - p_t)^2) at temperature T."""

    weight: float = Field(1.0, ge=0.0, description="Weight of the term.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of both distributions.")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=False)


@register("toy_l2")
class ToyL2(Method):
    Config = ToyConfig

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        t = self.cfg.temperature
        p_s = F.softmax(out.student_logits / t, dim=-1)
        p_t = F.softmax(out.teacher_logits.float() / t, dim=-1)
        return {"l2": self.cfg.weight * (p_s - p_t).pow(2).sum(-1).mean()}
'''

TOY_DRIVER = '''import json, sys
import kd_cluster.methods as methods
methods.__path__.append(sys.argv[1])  # the folder the one new file is in, as if it were kd_cluster/methods/
from kd_cluster.config import load_job
from kd_cluster.train import plan_job
spec = load_job(sys.argv[2])
plans = plan_job(spec, sys.argv[2], check_data="local")
checked_without_torch = "torch" not in sys.modules
try:
    plan_job(load_job(sys.argv[2], ["method.wieght=2.0"]), sys.argv[2], check_data="local")
    refused = ""
except Exception as exc:
    refused = str(exc)
from kd_cluster.cluster import run_job
res = run_job(spec, sys.argv[2], use_ray=False)
print("RESULT " + json.dumps({"needs": plans[-1].needs.teacher, "no_torch": checked_without_torch,
                              "refused": refused, "metrics": res.stages["toy"]["final_metrics"]}))
'''


def test_a_method_is_one_file(tiny_job, tmp_path: Path) -> None:
    """Adding a method is one file: the registry finds it in the methods package's folder(s), a job names it,
    validation knows its settings without importing torch, and the loop trains with its loss term."""
    import subprocess
    import sys

    folder = tmp_path / "more_methods"
    folder.mkdir()
    (folder / "toy_l2.py").write_text(TOY_METHOD)
    job = tiny_job("toy", method={"name": "toy_l2", "weight": 3.0},
                   stages=[{"name": "teacher", "trains": "teacher",
                            "set": {"method": {"name": "supervised"}, "schedule": {"steps": 4}}},
                           {"name": "toy"}])
    r = subprocess.run([sys.executable, "-c", TOY_DRIVER, str(folder), str(job)], capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert "RESULT " in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.rsplit("RESULT ", 1)[1])
    assert res["needs"] is True and res["no_torch"] is True
    assert "method.wieght: unknown setting for method 'toy_l2'; allowed: init, weight, temperature" in res["refused"]
    assert res["metrics"]["l2"] > 0 and "eval/student_top1" in res["metrics"], res["metrics"]
