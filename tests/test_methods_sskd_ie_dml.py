"""SSKD, IE-KD / IE-DML and DML: every loss term against its formula written out here on small tensors
(plain Python arithmetic), SSKD's filtering of the teacher's wrong predictions, and the peers' wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_cluster.methods import MethodError, SetupInfo, StepOutputs, build_method, method_config
from kd_cluster.methods.dml import mutual_terms
from kd_cluster.methods.ie_kd import factor_distance
from kd_cluster.methods.sskd import keep_mask, rotate_views

INFO = SetupInfo(num_classes=3, num_samples=100, world_size=1, total_steps=10, channels=1)


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl_rows(s: list[list[float]], t: list[list[float]], temp: float) -> list[float]:
    """KL(softmax(t/T) || softmax(s/T)) of each row."""
    out = []
    for srow, trow in zip(s, t):
        ps, pt = softmax(srow, temp), softmax(trow, temp)
        out.append(sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt)))
    return out


def ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(softmax(r)[k]) for r, k in zip(rows, labels)) / len(rows)


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ---------------------------------------------------------------- SSKD

def test_rotations_follow_each_image() -> None:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[4.0, 5.0], [6.0, 7.0]]]])
    v = rotate_views(x)
    assert v.shape == (8, 1, 2, 2)
    # image 0 and its rotations by 90, 180, 270 degrees (counter-clockwise), then image 1's
    assert v[0, 0].tolist() == [[0, 1], [2, 3]]
    assert v[1, 0].tolist() == [[1, 3], [0, 2]]
    assert v[2, 0].tolist() == [[3, 2], [1, 0]]
    assert v[3, 0].tolist() == [[2, 0], [3, 1]]
    assert v[4, 0].tolist() == [[4, 5], [6, 7]] and v[5, 0].tolist() == [[5, 7], [4, 6]]


def test_keep_mask_keeps_correct_rows_and_best_ranked_wrong_ones() -> None:
    target = torch.tensor([0, 0, 1, 2, 2, 1])
    scores = torch.tensor([
        [5.0, 1.0, 0.0],   # correct
        [0.0, 2.0, 1.0],   # wrong, true label ranks 3rd (rank 2)
        [1.0, 3.0, 0.0],   # correct
        [1.0, 0.0, 0.5],   # wrong, rank 1
        [0.0, 2.0, -1.0],  # wrong, rank 2
        [0.0, 1.0, 2.0],   # wrong, rank 1
    ])
    expect = {
        1.0: [0, 1, 2, 3, 4, 5],
        0.75: [0, 2, 3, 5, 1],     # floor(4 * 0.75) = 3 wrong: the two rank-1 rows, then the first rank-2 row
        0.5: [0, 2, 3, 5],         # floor(2.0): the rank-1 rows
        0.3: [0, 2, 3],            # floor(1.2): the first rank-1 row
        0.0: [0, 2],
    }
    for keep, rows in expect.items():
        assert keep_mask(scores, target, keep).nonzero().flatten().tolist() == sorted(rows), keep


# Two images x 4 views; rows 0 and 4 are the originals. Labels 0 and 2.
T_LOGITS = [[3, 0, 0], [2, 0, 0], [0, 2, 1], [1, 2, 0], [0, 0, 3], [0, 0, 1], [2, 0, 1], [0, 3, -1]]
S_LOGITS = [[0.5, 0.1, -0.3], [0.2, 0.4, 0.0], [1.0, -1.0, 0.5], [0.0, 0.3, 0.3],
            [-0.2, 0.1, 0.9], [0.4, 0.4, 0.1], [0.7, -0.5, 0.2], [0.0, 1.2, -0.4]]
T_FEAT = [[1, 0], [1, 0.1], [0.2, 1], [1, 1.5], [0, 1], [0.1, 1], [1, 0.5], [-1, 0.2]]
S_FEAT = [[0.5, 0.2], [0.3, 0.9], [1, -0.5], [0.2, 0.2], [-0.4, 0.7], [0.9, 0.1], [0.3, -0.8], [0.6, 0.6]]
LABELS = [0, 2]
AUG_ROWS = [1, 2, 3, 5, 6, 7]
SOURCE = [0, 0, 0, 1, 1, 1]


def _sskd(phase: str, **cfg: float) -> nn.Module:
    m = build_method("sskd", {"phase": phase, **cfg})
    z = torch.zeros(8, 2)
    m.setup(StepOutputs(student_logits=torch.zeros(8, 3), labels=torch.zeros(2, dtype=torch.long), lam=1.0,
                        student_features={"flatten": z} if phase == "student" else {},
                        teacher_features={"flatten": z}), INFO)
    m.t_head = nn.Identity()  # the similarity of the raw features, so the test can compute it by hand
    if phase == "student":
        m.s_head = nn.Identity()
    return m


def _sim_by_hand(feat: list[list[float]]) -> list[list[float]]:
    return [[cos(feat[r], feat[o]) for o in (0, 4)] for r in AUG_ROWS]


def _outputs(lam: float = 1.0) -> StepOutputs:
    return StepOutputs(student_logits=torch.tensor(S_LOGITS), teacher_logits=torch.tensor(T_LOGITS, dtype=torch.float),
                       labels=torch.tensor(LABELS), lam=lam, student_features={"flatten": torch.tensor(S_FEAT)},
                       teacher_features={"flatten": torch.tensor(T_FEAT)})


def test_sskd_head_stage_is_contrastive_ce_over_sources() -> None:
    m = _sskd("head")
    assert not m.needs.student and m.needs.teacher and m.needs.teacher_features == ("flatten",)
    out = m(_outputs())
    assert set(out) == {"ss_head"}
    assert out["ss_head"].item() == pytest.approx(ce(_sim_by_hand(T_FEAT), SOURCE), rel=1e-5)
    # rows 2, 3 (source 0) and 6 (source 1) are closer to the other original: 3 of 6 right
    assert m.metrics() == {"ss_head_top1": 0.5}


def test_sskd_student_terms_by_hand() -> None:
    w = {"ce_weight": 0.1, "kd_weight": 0.9, "tf_weight": 2.7, "ss_weight": 10.0}
    m = _sskd("student", tf_keep=0.5, ss_keep=0.75, **w)
    out = m(_outputs())
    assert set(out) == {"ce", "kd", "tf", "ss"}
    assert out["ce"].item() == pytest.approx(0.1 * ce([S_LOGITS[0], S_LOGITS[4]], LABELS), rel=1e-5)
    kd = kl_rows([S_LOGITS[0], S_LOGITS[4]], [T_LOGITS[0], T_LOGITS[4]], 4.0)
    assert out["kd"].item() == pytest.approx(0.9 * sum(kd) / 2 * 16, rel=1e-5)
    # rotated views: the teacher is right on rows 1 and 5; wrong on 3 and 6 (true label 2nd) and on 2 and
    # 7 (true label 3rd); keeping half of the 4 wrong ones keeps rows 3 and 6
    tf_rows = [1, 3, 5, 6]
    tf = kl_rows([S_LOGITS[r] for r in tf_rows], [T_LOGITS[r] for r in tf_rows], 4.0)
    assert out["tf"].item() == pytest.approx(2.7 * sum(tf) / 4 * 16, rel=1e-5)
    # similarity rows: the teacher's are wrong on aug rows 1, 2 (source 0) and 4 (source 1), all with the
    # true source 2nd; floor(3 * 0.75) = 2 of them are kept, in row order: aug rows 0, 1, 2, 3, 5
    s_sim, t_sim = _sim_by_hand(S_FEAT), _sim_by_hand(T_FEAT)
    ss_rows = [0, 1, 2, 3, 5]
    ss = kl_rows([s_sim[r] for r in ss_rows], [t_sim[r] for r in ss_rows], 0.5)
    assert out["ss"].item() == pytest.approx(10.0 * sum(ss) / 5 * 0.25, rel=1e-5)


def test_sskd_defaults_are_the_authors_code() -> None:
    cfg = method_config("sskd", {})
    assert (cfg.ce_weight, cfg.kd_weight, cfg.tf_weight, cfg.ss_weight) == (0.1, 0.9, 2.7, 10.0)
    assert (cfg.kd_temperature, cfg.tf_temperature, cfg.ss_temperature) == (4.0, 4.0, 0.5)
    assert (cfg.tf_keep, cfg.ss_keep) == (1.0, 0.75)


def test_sskd_teacher_head_frozen_student_head_trains() -> None:
    m = build_method("sskd", {})
    m.setup(StepOutputs(student_logits=torch.zeros(8, 3), labels=torch.zeros(2, dtype=torch.long), lam=1.0,
                        student_features={"flatten": torch.zeros(8, 4)},
                        teacher_features={"flatten": torch.zeros(8, 6)}), INFO)
    assert not any(p.requires_grad for p in m.t_head.parameters())
    assert all(p.requires_grad for p in m.s_head.parameters())
    assert m.s_head[0].in_features == 4 and m.t_head[0].in_features == 6
    assert m.expand(torch.zeros(3, 1, 5, 5)).shape == (12, 1, 5, 5)


def test_sskd_refuses_mixup() -> None:
    with pytest.raises(ValueError, match=r"mixup must be off \(augment.mixup_alpha: 0\)"):
        _sskd("student")(_outputs(lam=0.8))


# ---------------------------------------------------------------- IE-KD / IE-DML

A = [[[[1.0, -2.0]], [[0.5, 1.0]]], [[[0.0, 3.0]], [[2.0, -1.0]]]]    # (N=2, C=2, H=1, W=2)
B = [[[[0.5, 0.5]], [[1.0, -1.0]]], [[[1.0, 0.0]], [[-2.0, 2.0]]]]


def _norm(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _flat(sample: list) -> list[float]:
    return [v for ch in sample for row in ch for v in row]


def _attention(sample: list) -> list[float]:
    c = len(sample)
    return _norm([sum(sample[k][0][w] ** 2 for k in range(c)) / c for w in range(2)])


def test_factor_distances_by_hand() -> None:
    a, b = torch.tensor(A), torch.tensor(B)
    at = sum(math.dist(_attention(x), _attention(y)) for x, y in zip(A, B)) / 2
    assert factor_distance(a, b, "at").item() == pytest.approx(at, rel=1e-5)
    ft = sum(abs(u - v) for x, y in zip(A, B) for u, v in zip(_norm(_flat(x)), _norm(_flat(y)))) / 8
    assert factor_distance(a, b, "ft").item() == pytest.approx(ft, rel=1e-5)
    relu = lambda v: [max(0.0, x) for x in v]  # noqa: E731
    od = sum(sum((u - v) ** 2 for u, v in zip(_norm(relu(_flat(x))), _norm(relu(_flat(y))))) for x, y in zip(A, B)) / 2
    assert factor_distance(a, b, "od").item() == pytest.approx(od, rel=1e-5)
    for v in ("at", "ft", "od"):
        assert factor_distance(a, a, v).item() == pytest.approx(0.0, abs=1e-6)


def _ie(phase: str, **cfg) -> nn.Module:
    m = build_method("ie_kd", {"phase": phase, "teacher_layer": "t", "student_layer": "s", **cfg})
    torch.manual_seed(0)
    m.setup(StepOutputs(student_logits=torch.zeros(2, 3), labels=torch.zeros(2, dtype=torch.long), lam=1.0,
                        student_features={"s": torch.zeros(2, 6, 4, 4)} if phase == "student" else {},
                        teacher_features={"t": torch.zeros(2, 8, 4, 4)}), INFO)
    return m


def test_ie_autoencoder_stage_is_reconstruction_mse() -> None:
    m = _ie("autoencoder")
    assert not m.needs.student and m.needs.teacher_features == ("t",)
    assert m.teacher_ae.encoder[0].out_channels == 4  # factor = half the teacher's channels
    t = torch.randn(3, 8, 4, 4)
    out = m(StepOutputs(student_logits=None, labels=torch.zeros(3, dtype=torch.long), lam=1.0, teacher_features={"t": t}))
    rec = m.teacher_ae.decoder(m.teacher_ae.encoder(t))
    assert set(out) == {"rec"}
    assert out["rec"].item() == pytest.approx(((rec - t) ** 2).sum().item() / rec.numel(), rel=1e-5)


@pytest.mark.parametrize("variant", ["at", "ft", "od"])
def test_ie_student_terms(variant: str) -> None:
    m = _ie("student", variant=variant, inh_weight=2.0, exp_weight=0.5)
    m.train()
    assert not m.teacher_ae.training and not any(p.requires_grad for p in m.teacher_ae.parameters())
    s = torch.randn(3, 6, 4, 4, requires_grad=True)
    t = torch.randn(3, 8, 4, 4)
    logits = torch.randn(3, 3)
    out = m(StepOutputs(student_logits=logits, labels=torch.tensor([0, 1, 2]), lam=1.0,
                        student_features={"s": s}, teacher_features={"t": t}))
    assert set(out) == {"ce", "inh", "exp"}
    with torch.no_grad():
        factor = m.teacher_ae.encoder(t)
        inh = m.explorer.inh(s[:, :3])  # the inheritance half: the first 3 of 6 channels
        exp = m.explorer.exp(s[:, 3:])
    assert out["inh"].item() == pytest.approx(2.0 * factor_distance(inh, factor, variant).item(), rel=1e-5)
    assert out["exp"].item() == pytest.approx(-0.5 * factor_distance(exp, factor, variant).item(), rel=1e-5)
    assert out["exp"].item() < 0  # pushed away: the loss falls as the distance grows
    assert out["ce"].item() == pytest.approx(ce(logits.tolist(), [0, 1, 2]), rel=1e-5)
    # the inheritance term reaches only the first half of the student's channels
    grad = torch.autograd.grad(out["inh"], s)[0]
    assert grad[:, :3].abs().sum() > 0 and grad[:, 3:].abs().sum() == 0


def test_ie_spatial_mismatch_is_a_clear_error() -> None:
    m = build_method("ie_kd", {"teacher_layer": "t", "student_layer": "s"})
    with pytest.raises(ValueError, match=r"differ in spatial size \(\(8, 8\) vs \(4, 4\)\)"):
        m.setup(StepOutputs(student_logits=torch.zeros(2, 3), labels=torch.zeros(2, dtype=torch.long), lam=1.0,
                            student_features={"s": torch.zeros(2, 6, 8, 8)},
                            teacher_features={"t": torch.zeros(2, 8, 4, 4)}), INFO)


def test_ie_dml_two_students_each_learn_from_the_other() -> None:
    from kd_cluster.models import TappedModel, build_model

    m = build_method("ie_dml", {"peer_arch": "cnn_xs", "student_layer": "stage2", "peer_layer": "stage2"})
    student = TappedModel(build_model("cnn_s", num_classes=3, in_chans=1), ["stage2"])
    x = torch.randn(4, 1, 12, 12)
    logits, feats = student(x)
    m.setup(StepOutputs(student_logits=logits, labels=torch.zeros(4, dtype=torch.long), lam=1.0,
                        student_features=feats, images=x), INFO)
    # the student's stage2 has 32 channels, the peer's (cnn_xs) 16: each factor is half its source's
    assert m.student_ae.encoder[0].out_channels == 16 and m.peer_ae.encoder[0].out_channels == 8
    assert m.student_explorer.inh[0].out_channels == 8 and m.peer_explorer.inh[0].out_channels == 16
    y = torch.tensor([0, 1, 2, 0])
    logits, feats = student(x)
    out = m(StepOutputs(student_logits=logits, labels=y, lam=1.0, student_features=feats, images=x))
    names = {"ce", "kl", "inh", "exp", "rec"}
    assert set(out) == names | {f"peer_{n}" for n in names}
    p_logits = m.peer(x)[0]
    assert out["peer_ce"].item() == pytest.approx(ce(p_logits.tolist(), y.tolist()), rel=1e-4)
    assert out["kl"].item() == pytest.approx(sum(kl_rows(logits.tolist(), p_logits.tolist(), 1.0)) / 4, rel=1e-4)
    # the reconstruction trains only the auto-encoders, the KL targets are detached
    student.zero_grad()
    (out["rec"] + out["peer_kl"]).backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_ae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.peer.parameters())
    assert set(m.metrics()) == {"peer_train_top1"}


# ---------------------------------------------------------------- DML

def test_mutual_terms_by_hand() -> None:
    nets = [[[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]], [[0.0, 2.0, 0.0], [1.0, 1.0, -1.0]], [[0.5, 0.5, 0.5], [-1.0, 0.0, 2.0]]]
    y = [0, 2]
    logits = [torch.tensor(n, requires_grad=True) for n in nets]
    terms = mutual_terms(logits, torch.tensor(y), 1.0, kl_weight=0.5, temperature=2.0)
    for k, (ce_k, kl_k) in enumerate(terms):
        assert ce_k.item() == pytest.approx(ce(nets[k], y), rel=1e-5)
        others = [j for j in range(3) if j != k]
        expect = sum(sum(kl_rows(nets[k], nets[j], 2.0)) / 2 * 4 for j in others) / 2
        assert kl_k.item() == pytest.approx(0.5 * expect, rel=1e-5)
    # network 0's KL moves only network 0 (the others' predictions are targets)
    grads = torch.autograd.grad(terms[0][1], logits, allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_dml_peers_are_built_run_and_logged() -> None:
    m = build_method("dml", {"peers": ["cnn_xs", "cnn_xs"]})
    assert not m.needs.teacher and m.needs.labels
    x = torch.randn(4, 1, 12, 12)
    m.setup(StepOutputs(student_logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.long), lam=1.0, images=x), INFO)
    assert len(m.peers) == 2 and sum(p.numel() for p in m.parameters()) > 0
    s = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    out = m(StepOutputs(student_logits=s, labels=y, lam=1.0, images=x))
    assert set(out) == {"ce", "kl", "peer1_ce", "peer1_kl", "peer2_ce", "peer2_kl"}
    torch.stack(list(out.values())).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    met = m.metrics()
    assert set(met) == {"peer1_train_top1", "peer2_train_top1"} and all(0 <= v <= 1 for v in met.values())
    assert m.metrics() == {}  # read once per log window


def test_dml_unknown_peer_names_the_field() -> None:
    with pytest.raises(MethodError, match=r"method\.peers: .*unknown model 'cnn_xxs'"):
        method_config("dml", {"peers": ["cnn_xxs"]})
    with pytest.raises(MethodError, match=r"method\.peer_arch"):
        method_config("ie_dml", {"peer_arch": "nope_net"})
