"""IE-KD and IE-DML (Huang et al., CVPR 2021, "Revisiting Knowledge Distillation: An Inheritance and
Exploration Framework").

``ie_kd``, two phases run as two stages of a job:

``phase: autoencoder`` compacts the frozen teacher's feature map (``teacher_layer``) with a
  convolutional auto-encoder trained on the reconstruction loss (mean squared error); only the
  auto-encoder trains (``student=False``). Its encoder output, the *factor*, has
  ``factor_ratio`` x the teacher's channels.
``phase: student`` (``init: stage:<autoencoder stage>``, the auto-encoder frozen): the student's
  feature map (``student_layer``) is split channel-wise into an inheritance half (the first
  channels) and an exploration half; each goes through its own encoder to the factor's shape.
  Loss = CE + inh_weight * d(inh factor, teacher factor) - exp_weight * d(exp factor, teacher factor).

``variant`` picks the distance d between factors a and b (per sample, averaged over the batch):

- ``at`` (IE-AT): attention maps q = mean over channels of x^2, flattened and L2-normalised;
  d = || q_a - q_b ||_2.
- ``ft`` (IE-FT): factors flattened and L2-normalised; d = mean over elements of | a - b | (L1).
- ``od`` (IE-OD): ReLU'd factors flattened and L2-normalised; d = || a - b ||_2^2.

All three distances are bounded (normalised inputs), so the exploration term cannot grow without end.

``ie_dml``: two students trained together from scratch, the job's student and a peer owned by the
method (``peer_arch``, run on the same batch). Each network has its own auto-encoder compacting its
feature map, trained jointly on the reconstruction loss (of the detached feature, so the
reconstruction does not shape the network). Each network's goal is DML's (CE + KL to the other's
detached prediction), plus inheritance from and exploration away from the other network's factor
(detached).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kd_cluster.methods.base import (F, Method, MethodConfig, Module, Needs, SetupInfo, StepOutputs, check_arch,
                                     mixed_cross_entropy, nn, register, soft_kl, torch)
from kd_cluster.methods.dml import HitCounter, broadcast_from_rank0, build_peer

Variant = Literal["at", "ft", "od"]


class IEConfig(MethodConfig):
    """Settings shared by ``ie_kd`` and ``ie_dml``."""

    variant: Variant = Field("at", description="Distance between factors: at (attention maps), ft (L1 of "
                             "L2-normalised factors), od (L2 of ReLU'd, normalised factors).")
    factor_ratio: float = Field(0.5, gt=0, le=4, description="Factor channels = round(ratio x the compacted "
                                "feature's channels).")
    inh_weight: float = Field(1.0, ge=0, description="Weight of the inheritance loss.")
    exp_weight: float = Field(1.0, ge=0, description="Weight of the exploration loss (entered negated).")

    def factor_channels(self, channels: int) -> int:
        return max(1, round(self.factor_ratio * channels))


class IEKDConfig(IEConfig):
    """Settings of ``ie_kd``."""

    phase: Literal["autoencoder", "student"] = Field("student", description="'autoencoder': train the "
                                                     "auto-encoder on the frozen teacher (a stage of its own); "
                                                     "'student': distill, with init: stage:<autoencoder stage>.")
    teacher_layer: str = Field("stage3", description="Feature tap of the teacher's feature map to compact.")
    student_layer: str = Field("stage3", description="Feature tap of the student's feature map to split "
                               "(same spatial size as the teacher's).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the CE.")

    def needs(self) -> Needs:
        if self.phase == "autoencoder":
            return Needs(teacher=True, student=False, teacher_features=(self.teacher_layer,))
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


class IEDMLConfig(IEConfig):
    """Settings of ``ie_dml``."""

    peer_arch: str = Field(description="Model name of the second student (trained from scratch with the first).")
    student_layer: str = Field("stage3", description="Feature tap of the job's student.")
    peer_layer: str = Field("stage3", description="Feature tap of the peer (same spatial size as the student's).")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the mutual-learning KL.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the mutual-learning KL.")
    rec_weight: float = Field(1.0, ge=0, description="Weight of each auto-encoder's reconstruction loss.")

    @field_validator("peer_arch")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_arch(v)

    def needs(self) -> Needs:
        return Needs(teacher=False, labels=True, student_features=(self.student_layer,))


def coder(c_in: int, c_out: int) -> nn.Sequential:
    """Three conv3x3-BN-LeakyReLU(0.1) layers, c_in -> c_out, same spatial size (one half of the auto-encoder)."""
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out), (c_out, c_out)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class AutoEncoder(Module):
    """encoder: C -> F channels (the factor); decoder: F -> C."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = coder(channels, factor_channels)
        self.decoder = coder(factor_channels, channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor, reconstruction)."""
        f = self.encoder(x)
        return f, self.decoder(f)


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): mean over channels of x^2, L2-normalised per sample."""
    return F.normalize(x.float().pow(2).mean(dim=1).flatten(1), dim=1)


def factor_distance(a: torch.Tensor, b: torch.Tensor, variant: Variant) -> torch.Tensor:
    """The distance between two factor maps of one variant, averaged over the batch (see the module doc)."""
    if variant == "at":
        return (attention_map(a) - attention_map(b)).norm(dim=1).mean()
    if variant == "ft":
        return (F.normalize(a.float().flatten(1), dim=1) - F.normalize(b.float().flatten(1), dim=1)).abs().mean()
    if variant == "od":
        na = F.normalize(F.relu(a.float()).flatten(1), dim=1)
        nb = F.normalize(F.relu(b.float()).flatten(1), dim=1)
        return (na - nb).pow(2).sum(dim=1).mean()
    raise AssertionError(f"unhandled variant {variant}")


def split_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inheritance part: the first floor(C/2) channels, exploration part: the rest)."""
    half = x.shape[1] // 2
    return x[:, :half], x[:, half:]


class Explorer(Module):
    """A network's inheritance and exploration encoders: its feature halves -> two factors."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"the feature map to split has {channels} channel(s); it needs at least 2")
        self.inh = coder(channels // 2, factor_channels)
        self.exp = coder(channels - channels // 2, factor_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = split_channels(x)
        return self.inh(a), self.exp(b)


def _check_spatial(student: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if student.dim() != 4 or target.dim() != 4:
        raise ValueError(f"{what}: feature taps must be feature maps (N, C, H, W), got shapes "
                         f"{tuple(student.shape)} and {tuple(target.shape)}")
    if student.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"{what}: the feature maps differ in spatial size ({tuple(student.shape[-2:])} vs "
                         f"{tuple(target.shape[-2:])}); choose layers with the same resolution")


@register("ie_kd")
class IEKD(Method):
    """Inheritance and exploration from a compacted, frozen teacher."""

    Config = IEKDConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        t = probe.teacher_features[self.cfg.teacher_layer]
        if t.dim() != 4:
            raise ValueError(f"method ie_kd: teacher_layer {self.cfg.teacher_layer!r} is not a feature map "
                             f"(shape {tuple(t.shape)})")
        f = self.cfg.factor_channels(t.shape[1])
        self.teacher_ae = AutoEncoder(t.shape[1], f)
        if self.cfg.phase == "student":
            s = probe.student_features[self.cfg.student_layer]
            _check_spatial(s, t, f"method ie_kd: student {self.cfg.student_layer!r} vs teacher {self.cfg.teacher_layer!r}")
            self.teacher_ae.requires_grad_(False)  # trained by the auto-encoder stage, frozen here
            self.explorer = Explorer(s.shape[1], f)

    def train(self, mode: bool = True) -> IEKD:
        super().train(mode)
        if self.cfg.phase == "student" and hasattr(self, "teacher_ae"):
            self.teacher_ae.eval()
        return self

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        t = out.teacher_features[cfg.teacher_layer]
        if cfg.phase == "autoencoder":
            _, rec = self.teacher_ae(t)
            return {"rec": F.mse_loss(rec, t)}
        assert out.student_logits is not None
        with torch.no_grad():
            factor = self.teacher_ae.encoder(t)
        inh, exp = self.explorer(out.student_features[cfg.student_layer])
        return {
            "ce": mixed_cross_entropy(out.student_logits, out.labels, out.lam, cfg.label_smoothing),
            "inh": cfg.inh_weight * factor_distance(inh, factor, cfg.variant),
            "exp": -cfg.exp_weight * factor_distance(exp, factor, cfg.variant),
        }


@register("ie_dml")
class IEDML(Method):
    """Two students learning mutually, each inheriting from and exploring away from the other's factors."""

    Config = IEDMLConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        cfg = self.cfg
        self.peer = build_peer(cfg.peer_arch, info, (cfg.peer_layer,))
        assert probe.images is not None
        self.peer.eval()
        with torch.no_grad():
            p = self.peer(probe.images.cpu())[1][cfg.peer_layer]
        self.peer.train()
        s = probe.student_features[cfg.student_layer]
        _check_spatial(s, p, f"method ie_dml: student {cfg.student_layer!r} vs peer {cfg.peer_layer!r}")
        fs, fp = cfg.factor_channels(s.shape[1]), cfg.factor_channels(p.shape[1])
        self.student_ae = AutoEncoder(s.shape[1], fs)   # compacts the student's feature (for the peer)
        self.peer_ae = AutoEncoder(p.shape[1], fp)      # compacts the peer's feature (for the student)
        self.student_explorer = Explorer(s.shape[1], fp)
        self.peer_explorer = Explorer(p.shape[1], fs)
        self._hits = HitCounter()
        self._synced = False

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        assert out.images is not None and out.student_logits is not None
        broadcast_from_rank0(self.peer, params=not self._synced)
        self._synced = True
        p_logits, p_feats = self.peer(out.images)
        p_logits = p_logits.float()
        self._hits.add([p_logits], out.labels)
        nets = {"": (out.student_logits, out.student_features[cfg.student_layer].float(), self.student_ae,
                     self.student_explorer),
                "peer_": (p_logits, p_feats[cfg.peer_layer].float(), self.peer_ae, self.peer_explorer)}
        factors = {}
        terms: dict[str, torch.Tensor] = {}
        for name, (_, feat, ae, _) in nets.items():
            x = feat.detach()
            factor, rec = ae(x)
            terms[f"{name}rec"] = cfg.rec_weight * F.mse_loss(rec, x)
            factors[name] = factor.detach()
        for name, other in (("", "peer_"), ("peer_", "")):
            logits, feat, _, explorer = nets[name]
            inh, exp = explorer(feat)
            terms[f"{name}ce"] = mixed_cross_entropy(logits, out.labels, out.lam)
            terms[f"{name}kl"] = cfg.kl_weight * soft_kl(logits, nets[other][0].detach(), cfg.temperature)
            terms[f"{name}inh"] = cfg.inh_weight * factor_distance(inh, factors[other], cfg.variant)
            terms[f"{name}exp"] = -cfg.exp_weight * factor_distance(exp, factors[other], cfg.variant)
        return terms

    def metrics(self) -> dict[str, float]:
        """The peer's top-1 on the training batches since the last log."""
        return self._hits.read(["peer_train_top1"])
