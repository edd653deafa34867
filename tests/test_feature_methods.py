"""FitNet, AT, PAD and CRD: each loss on fixed small tensors against the formula written out in numpy."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kd_cluster.config import SpecError, load_job
from kd_cluster.methods import SetupInfo, StepOutputs, build_method

T = 4.0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ce(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-_log_softmax(logits)[np.arange(len(labels)), labels].mean())


def _kd(s: np.ndarray, t: np.ndarray) -> float:
    lp_s, lp_t = _log_softmax(s / T), _log_softmax(t / T)
    return float((np.exp(lp_t) * (lp_t - lp_s)).sum(axis=1).mean() * T * T)


def _outputs(s_feats: dict, t_feats: dict, n: int, index: torch.Tensor | None = None, step: int = 0) -> StepOutputs:
    g = torch.Generator().manual_seed(1)
    return StepOutputs(student_logits=torch.randn(n, 5, generator=g), labels=torch.arange(n) % 5, lam=1.0,
                       teacher_logits=torch.randn(n, 5, generator=g), student_features=s_feats,
                       teacher_features=t_feats, index=index, step=step)


def _info(n: int = 100, total: int = 100) -> SetupInfo:
    return SetupInfo(num_classes=5, num_samples=n, world_size=1, total_steps=total)


def _fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_fitnet_hint_regressor_pooled_to_teacher_size_plus_ce_and_kd() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 2, 2, generator=g)
    m = build_method("fitnet", {"student_layer": "a", "teacher_layer": "b", "ce_weight": 1.0, "kd_weight": 0.5})
    out = _outputs({"a": s}, {"b": t}, 2)
    m.setup(out, _info())
    _fill(m, 3)
    terms = m(out)
    w = _np(m.regressor[0].weight)[:, :, 0, 0]
    b = _np(m.regressor[0].bias)
    r = np.einsum("oc,nchw->nohw", w, _np(s)) + b[None, :, None, None]
    r = r.reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 by averaging 2x2 windows
    assert terms["hint"].item() == pytest.approx(100 * ((r - _np(t)) ** 2).mean(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(_ce(_np(out.student_logits), out.labels.numpy()), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(0.5 * _kd(_np(out.student_logits), _np(out.teacher_logits)), rel=1e-5)


def test_fitnet_hint_stage_keeps_every_student_parameter_in_the_graph() -> None:
    m = build_method("fitnet", {"student_layer": "a", "teacher_layer": "b", "ce_weight": 0.0})
    logits = torch.randn(2, 5, requires_grad=True)
    out = _outputs({"a": torch.randn(2, 3, 2, 2)}, {"b": torch.randn(2, 4, 2, 2)}, 2)
    m.setup(out, _info())
    out.student_logits = logits
    terms = m(out)
    assert set(terms) == {"hint", "unused"} and terms["unused"].item() == 0.0
    sum(terms.values()).backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_at_attention_maps_resized_normalised_beta_half() -> None:
    g = torch.Generator().manual_seed(0)
    s1, t1 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    s2, t2 = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    m = build_method("at", {"student_layers": ["s1", "s2"], "teacher_layers": ["t1", "t2"], "beta": 1000.0})
    out = _outputs({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}, 2)
    terms = m(out)

    def amap(f: np.ndarray, pool: bool = False) -> np.ndarray:
        a = (f ** 2).mean(axis=1)  # [N, H, W]
        if pool:
            a = a.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4))
        a = a.reshape(2, -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    d1 = ((amap(_np(s1), pool=True) - amap(_np(t1))) ** 2).mean()
    d2 = ((amap(_np(s2)) - amap(_np(t2))) ** 2).mean()
    assert terms["at"].item() == pytest.approx(1000 / 2 * (d1 + d2), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(_ce(_np(out.student_logits), out.labels.numpy()), rel=1e-5)
    with pytest.raises(ValueError, match="pair up"):
        build_method("at", {"student_layers": ["a"], "teacher_layers": ["a", "b"]})


@pytest.mark.parametrize(("step", "ramp"), [(5, 0.5), (50, 1.0), (0, 0.0)])
def test_pad_uncertainty_weighted_distance_with_warmup(step: int, ramp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 3, 3, generator=g), torch.randn(4, 3, generator=g)
    m = build_method("pad", {"student_layer": "a", "teacher_layer": "b", "warmup_fraction": 0.1, "ce_weight": 0.0,
                             "feature_weight": 2.0})
    out = _outputs({"a": s}, {"b": t}, 4, step=step)
    m.setup(out, _info(total=100))
    _fill(m, 5)
    terms = m(out)
    f = _np(s).mean(axis=(2, 3))
    conn = f @ _np(m.connector.weight).T + _np(m.connector.bias)
    v = ramp * (f @ _np(m.log_var.weight).T + _np(m.log_var.bias))
    expected = ((_np(t) - conn) ** 2 / (1e-6 + np.exp(v)) + v).mean()
    assert terms["pad"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    assert m.metrics() == {"pad/ramp": ramp}


def test_pad_l2_warmup_stage() -> None:
    s, t = torch.randn(4, 6), torch.randn(4, 3)
    m = build_method("pad", {"student_layer": "a", "teacher_layer": "b", "mode": "l2"})
    out = _outputs({"a": s}, {"b": t}, 4)
    m.setup(out, _info())
    _fill(m, 2)
    conn = _np(s) @ _np(m.connector.weight).T + _np(m.connector.bias)
    assert m(out)["l2"].item() == pytest.approx(((_np(t) - conn) ** 2).mean(), rel=1e-5)


def _crd(n: int = 10, k: int = 3, **kw) -> tuple:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 5, 2, 2, generator=g)
    index = torch.tensor([7, 2, 4])
    m = build_method("crd", {"student_layer": "a", "teacher_layer": "b", "feat_dim": 4, "num_negatives": k, **kw})
    out = _outputs({"a": s}, {"b": t}, 3, index=index)
    m.setup(out, _info(n=n))
    _fill(m, 4)
    return m, out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_crd_nce_both_ways_z_estimated_once_and_bank_momentum_update() -> None:
    n, k, tau = 10, 3, 0.07
    m, out = _crd(n, k)
    rows = torch.tensor([[7, 1, 2, 9], [2, 0, 5, 5], [4, 8, 3, 1]])
    m._negatives = lambda index, step: rows  # fixed negatives: the formula below uses the same rows
    mem_s, mem_t = _np(m.memory_s).copy(), _np(m.memory_t).copy()
    v_s = _unit(_np(out.student_features["a"]) @ _np(m.embed_s.weight).T + _np(m.embed_s.bias))
    t_pool = _np(out.teacher_features["b"]).mean(axis=(2, 3))
    v_t = _unit(t_pool @ _np(m.embed_t.weight).T + _np(m.embed_t.bias))
    r = rows.numpy()

    def nce(v: np.ndarray, bank: np.ndarray) -> tuple[float, float]:
        e = np.exp(np.einsum("bkd,bd->bk", bank[r], v) / tau)
        z = e.mean() * n
        p = e / z
        mpn = k / n
        loss = -(np.log(p[:, 0] / (p[:, 0] + mpn + 1e-7)).sum() + np.log(mpn / (p[:, 1:] + mpn + 1e-7)).sum()) / 3
        return loss, z

    l_s, z_s = nce(v_s, mem_t)
    l_t, z_t = nce(v_t, mem_s)
    terms = m(out)
    assert terms["crd"].item() == pytest.approx(0.8 * (l_s + l_t), rel=1e-4)
    assert m.z_s.item() == pytest.approx(z_s, rel=1e-5) and m.z_t.item() == pytest.approx(z_t, rel=1e-5)
    idx = out.index.numpy()
    exp_s = mem_s.copy()
    exp_s[idx] = _unit(0.5 * mem_s[idx] + 0.5 * v_s)
    exp_t = mem_t.copy()
    exp_t[idx] = _unit(0.5 * mem_t[idx] + 0.5 * v_t)
    np.testing.assert_allclose(_np(m.memory_s), exp_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(m.memory_t), exp_t, rtol=1e-5, atol=1e-6)
    z_before = m.z_s.item()
    m(out)
    assert m.z_s.item() == z_before  # Z stays fixed after its first estimate
    state = m.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(state)  # checkpointed with the method


def test_crd_negatives_capped_and_index_checked() -> None:
    with pytest.warns(UserWarning, match="num_negatives 16384 capped at 9"):
        m, out = _crd(n=10, k=16384)
    assert m._negatives(out.index, 3).shape == (3, 10)
    assert torch.equal(m._negatives(out.index, 3), m._negatives(out.index, 3))  # (seed, step, rank)
    m, out = _crd(n=5)
    with pytest.raises(ValueError, match=r"sample index 7 is outside \[0, 5\)"):
        m(out)


def _crd_rank(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        m = build_method("crd", {"student_layer": "a", "teacher_layer": "b", "feat_dim": 4, "num_negatives": 3})
        g = torch.Generator().manual_seed(10 + rank)  # each rank sees other samples
        probe = _outputs({"a": torch.zeros(2, 6)}, {"b": torch.zeros(2, 5)}, 2, index=torch.arange(2))
        m.setup(probe, _info(n=12))
        torch.manual_seed(1)
        _fill(m, 4)
        for step in range(2):
            index = torch.tensor([rank * 2 + step * 4, rank * 2 + 1 + step * 4])
            m(_outputs({"a": torch.randn(2, 6, generator=g)}, {"b": torch.randn(2, 5, generator=g)}, 2,
                       index=index, step=step))
        results[rank] = (m.memory_s.clone(), m.memory_t.clone(), m.z_s.clone())
    finally:
        dist.destroy_process_group()


def test_crd_banks_stay_identical_across_two_ranks() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_crd_rank, args=(r, port, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        (s0, t0, z0), (s1, t1, z1) = results[0], results[1]
    assert torch.equal(s0, s1) and torch.equal(t0, t1) and torch.equal(z0, z1)
    # rows 0..7 were written by one rank or the other, rows 8..11 by nobody
    fresh = build_method("crd", {"student_layer": "a", "teacher_layer": "b", "feat_dim": 4, "num_negatives": 3})
    fresh.setup(_outputs({"a": torch.zeros(2, 6)}, {"b": torch.zeros(2, 5)}, 2, index=torch.arange(2)), _info(n=12))
    assert not torch.allclose(s0[:8], fresh.memory_s[:8]) and torch.equal(s0[8:], fresh.memory_s[8:])
    assert torch.allclose(s0[:8].norm(dim=1), torch.ones(8))


def test_wrong_tap_of_a_feature_method_lists_existing_names(tiny_job) -> None:
    from kd_cluster.train import plan_job

    job = tiny_job("badtap", method={"name": "at", "student_layers": ["stage1", "stage9"],
                                     "teacher_layers": ["stage1", "stage2"]})
    with pytest.raises(SpecError, match=r"student feature taps: unknown feature tap 'stage9'.*close matches: stage3, stage2, stage1"):
        plan_job(load_job(job), str(job), check_data="none")
