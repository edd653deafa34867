"""DKD, DIST and logit standardization: each loss against its formula written out here, and against the values of
the public reference implementations on fixed tensors (tests/reference/fixtures.json, written by
tests/reference/make_fixtures.py from torchdistill 1.1.5 and mmrazor 1.0.0)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kd_cluster.methods import SetupInfo, StepOutputs, build_method

FIXTURES = json.loads((Path(__file__).parent / "reference" / "fixtures.json").read_text())


def _terms(name: str, params: dict, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step: int = 10**6,
           total: int = 100) -> dict[str, float]:
    m = build_method(name, params)
    m.setup(StepOutputs(s, y, 1.0, t), SetupInfo(s.shape[1], 1000, 1, total))
    return {k: float(v) for k, v in m(StepOutputs(s, y, 1.0, t, step=step)).items()}


def _case(c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(c["student"]), torch.tensor(c["teacher"]), torch.tensor(c["labels"])


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=lambda c: f"{c['batch']}x{c['classes']}")
def test_dist_matches_torchdistill(case: dict) -> None:
    """To float precision, but for 7 samples of 100 classes: there some classes' probabilities barely vary over the
    batch (norms ~1e-5), and the authors' correlation (kd_cluster's: eps added to the product of the norms) and
    torchdistill's (F.cosine_similarity, each norm clamped at eps) part by ~1e-4 of the loss."""
    s, t, y = _case(case)
    rel = 1e-5 if case["classes"] <= 10 else 2e-4
    for ref in case["dist"]:
        got = _terms("dist", {"ce_weight": 0.0, "beta": ref["beta"], "gamma": ref["gamma"],
                              "temperature": ref["temperature"]}, s, t, y)
        assert got["inter"] + got["intra"] == pytest.approx(ref["value"], rel=rel, abs=1e-6), ref


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=lambda c: f"{c['batch']}x{c['classes']}")
def test_kd_with_logit_standardization_matches_torchdistill(case: dict) -> None:
    s, t, y = _case(case)
    for ref in case["kd_ls"]:
        got = _terms("kd", {"temperature": ref["temperature"], "alpha": ref["alpha"], "logit_standardization": True},
                     s, t, y)
        assert got["kl"] + got["ce"] == pytest.approx(ref["value"], rel=1e-5, abs=1e-6), ref


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=lambda c: f"{c['batch']}x{c['classes']}")
def test_dkd_matches_the_reference_formula(case: dict) -> None:
    """mmrazor's DKDLoss: the formula of the authors' mdistiller, batch-mean KLs times T^2."""
    s, t, y = _case(case)
    for ref in case["dkd"]:
        got = _terms("dkd", {"ce_weight": 0.0, "alpha": ref["alpha"], "beta": ref["beta"],
                             "temperature": ref["temperature"], "warmup_fraction": 0.0}, s, t, y)
        assert got["tckd"] + got["nckd"] == pytest.approx(ref["value"], rel=1e-5), ref


def test_dkd_decomposes_kd() -> None:
    """The paper's identity: KD = TCKD + (1 - p_t of the labelled class) * NCKD, per sample (T = 1, no T^2)."""
    from kd_cluster.methods.dkd import dkd_terms

    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        s, t = torch.randn(1, 7, generator=g) * 2, torch.randn(1, 7, generator=g) * 2
        y = torch.randint(0, 7, (1,), generator=g)
        tckd, nckd = dkd_terms(s, t, y, 1.0)
        p_t = torch.softmax(t, 1)
        kd = (p_t * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum()
        assert float(kd) == pytest.approx(float(tckd + (1 - p_t[0, y[0]]) * nckd), rel=1e-5)


def test_dkd_terms_by_hand_and_its_warm_up() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 2.0, -1.0]])
    y = torch.tensor([0])
    T = 2.0
    ps, pt = torch.softmax(s / T, 1)[0], torch.softmax(t / T, 1)[0]
    bs, bt = [ps[0], 1 - ps[0]], [pt[0], 1 - pt[0]]
    tckd = float(sum(b * math.log(b / a) for a, b in zip(bs, bt))) * T * T
    qs, qt = torch.softmax(s[0, 1:] / T, 0), torch.softmax(t[0, 1:] / T, 0)
    nckd = float((qt * (qt / qs).log()).sum()) * T * T
    full = _terms("dkd", {"ce_weight": 0.0, "alpha": 1.0, "beta": 3.0, "temperature": T, "warmup_fraction": 0.5},
                  s, t, y, step=99, total=100)
    assert full["tckd"] == pytest.approx(tckd, rel=1e-5) and full["nckd"] == pytest.approx(3 * nckd, rel=1e-5, abs=1e-6)
    early = _terms("dkd", {"ce_weight": 0.0, "beta": 3.0, "temperature": T, "warmup_fraction": 0.5}, s, t, y, step=9,
                   total=100)
    assert early["nckd"] == pytest.approx(3 * nckd * 10 / 50, rel=1e-5)  # step 10 of a 50-step ramp


def test_dist_terms_by_hand() -> None:
    """Inter: 1 - mean over samples of the Pearson correlation over classes; intra: over the batch, per class."""
    import numpy as np

    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    y = torch.zeros(6, dtype=torch.long)
    T = 2.0
    ys, yt = torch.softmax(s / T, 1).numpy(), torch.softmax(t / T, 1).numpy()
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(6)])
    intra = 1 - np.mean([np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(5)])
    got = _terms("dist", {"ce_weight": 0.0, "beta": 1.0, "gamma": 2.0, "temperature": T}, s, t, y)
    assert got["inter"] == pytest.approx(T * T * inter, rel=1e-4) and got["intra"] == pytest.approx(2 * T * T * intra,
                                                                                                    rel=1e-4)


def test_logit_standardization_ignores_the_teacher_s_scale_and_shift() -> None:
    """z-scored logits: a teacher whose logits are 5 z + 3 gives the same KD, DKD and funmatch terms as one of z;
    without standardization it does not; the label CE uses the raw student logits."""
    g = torch.Generator().manual_seed(7)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    for name, params in (("kd", {"alpha": 0.5}), ("dkd", {"warmup_fraction": 0.0}), ("funmatch", {})):
        on = {**params, "logit_standardization": True}
        assert _terms(name, on, s, t, y) == pytest.approx(_terms(name, on, s, 5 * t + 3, y), rel=1e-5)
        assert _terms(name, params, s, t, y) != pytest.approx(_terms(name, params, s, 5 * t + 3, y), rel=1e-3)
    plain, std = _terms("kd", {"alpha": 0.5}, s, t, y), _terms("kd", {"alpha": 0.5, "logit_standardization": True}, s, t, y)
    assert plain["ce"] == std["ce"]
