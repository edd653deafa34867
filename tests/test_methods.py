"""Loss terms against values computed by hand on fixed tensors (formulas written out, not the implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from kd_cluster.methods import METHODS, Method, MethodError, SetupInfo, StepOutputs, build_method, method_config

S = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
T = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, -2.0]])
Y = torch.tensor([0, 1])


def softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    z = sum(e)
    return [v / z for v in e]


def kl_by_hand(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow, temp), softmax(trow, temp)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    return total / len(s) * temp * temp


def ce_by_hand(s: torch.Tensor, y: torch.Tensor) -> float:
    return sum(-math.log(softmax(row, 1.0)[k]) for row, k in zip(s.tolist(), y.tolist())) / len(s)


def test_kd_terms() -> None:
    m = build_method("kd", {"temperature": 4.0, "alpha": 0.9})
    out = m(StepOutputs(student_logits=S, teacher_logits=T, labels=Y, lam=1.0))
    assert set(out) == {"kl", "ce"}
    assert out["kl"].item() == pytest.approx(0.9 * kl_by_hand(S, T, 4.0), rel=1e-5)
    assert out["ce"].item() == pytest.approx(0.1 * ce_by_hand(S, Y), rel=1e-5)


def test_kd_mixup_ce_mixes_labels() -> None:
    m = build_method("kd", {"temperature": 2.0, "alpha": 0.0})
    out = m(StepOutputs(student_logits=S, teacher_logits=T, labels=Y, lam=0.7))
    rolled = torch.tensor([1, 0])  # partner = batch rolled by one
    assert out["ce"].item() == pytest.approx(0.7 * ce_by_hand(S, Y) + 0.3 * ce_by_hand(S, rolled), rel=1e-5)
    assert out["kl"].item() == 0.0


def test_funmatch_is_kl_only() -> None:
    m = build_method("funmatch", {"temperature": 1.0})
    out = m(StepOutputs(student_logits=S, teacher_logits=T, labels=Y, lam=0.6))
    assert set(out) == {"kl"}
    assert out["kl"].item() == pytest.approx(kl_by_hand(S, T, 1.0), rel=1e-5)
    assert m.needs.teacher and m.needs.teacher_view == "same" and not m.needs.labels


def test_funmatch_kl_zero_when_equal() -> None:
    m = build_method("funmatch", {"temperature": 2.0})
    assert m(StepOutputs(student_logits=T, teacher_logits=T, labels=Y, lam=1.0))["kl"].item() == pytest.approx(0, abs=1e-7)


def test_fixed_teacher_mixes_targets_as_probabilities() -> None:
    m = build_method("fixed_teacher", {"temperature": 1.0})
    lam = 0.75
    out = m(StepOutputs(student_logits=S, teacher_logits=T, labels=Y, lam=lam))
    pt = [softmax(r, 1.0) for r in T.tolist()]
    target = [[lam * a + (1 - lam) * b for a, b in zip(pt[i], pt[i - 1])] for i in range(2)]
    expect = 0.0
    for srow, trow in zip(S.tolist(), target):
        ps = softmax(srow, 1.0)
        expect += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, trow))
    assert out["kl"].item() == pytest.approx(expect / 2, rel=1e-5)
    assert m.needs.teacher_view == "center"


def test_independent_views_declares_its_view() -> None:
    assert build_method("independent_views", {}).needs.teacher_view == "independent"


def test_supervised_label_smoothing() -> None:
    m = build_method("supervised", {"label_smoothing": 0.1})
    out = m(StepOutputs(student_logits=S, labels=Y, lam=1.0))
    eps, k = 0.1, 3
    expect = 0.0
    for row, y in zip(S.tolist(), Y.tolist()):
        logp = [math.log(p) for p in softmax(row, 1.0)]
        expect += -((1 - eps) * logp[y] + eps / k * sum(logp))
    assert out["ce"].item() == pytest.approx(expect / 2, rel=1e-5)


# Settings for methods that have required ones (feature taps); every other method is built with {}.
EXAMPLE_SETTINGS = {
    "fitnet": {"student_layer": "f", "teacher_layer": "f"},
    "at": {"student_layers": ["f"], "teacher_layers": ["f"]},
    "pad": {"student_layer": "f", "teacher_layer": "f"},
    "crd": {"student_layer": "f", "teacher_layer": "f", "num_negatives": 4},
}


# methods with required settings get them here; others that build modules from real feature shapes in
# setup() are exercised in their own test files
@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.setup is Method.setup
                                        or n in EXAMPLE_SETTINGS))
def test_every_method_returns_named_differentiable_terms(name: str) -> None:
    m = build_method(name, EXAMPLE_SETTINGS.get(name, {}))
    s = S.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    out = StepOutputs(student_logits=s, teacher_logits=T, labels=Y, lam=0.8,
                      student_features={k: torch.randn(2, 4, 3, 3, generator=g) for k in m.needs.student_features},
                      teacher_features={k: torch.randn(2, 5, 3, 3, generator=g) for k in m.needs.teacher_features},
                      index=torch.arange(2) if m.needs.index else None)
    m.setup(out, SetupInfo(num_classes=3, num_samples=10, world_size=1, total_steps=10))
    out = m(out)
    assert out and all(v.ndim == 0 for v in out.values())
    torch.stack(list(out.values())).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_bad_settings_name_field_and_allowed() -> None:
    with pytest.raises(MethodError, match=r"method\.temperature.*greater than 0"):
        method_config("kd", {"temperature": -1})
    with pytest.raises(MethodError, match="allowed: init, logit_standardization, temperature, alpha"):
        method_config("kd", {"tau": 2})
