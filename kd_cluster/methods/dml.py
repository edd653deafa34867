"""DML (Zhang et al., CVPR 2018, "Deep Mutual Learning"): students teach each other, no pre-trained teacher.

The job's student is network 0; the method owns the other ``peers`` (built by arch name in ``setup``,
run on the same input batch). Each network k minimises

    CE(p_k, y) + kl_weight * T^2 * 1/(K-1) * sum_{l != k} KL(p_l^T || p_k^T)

with the targets p_l detached. The paper updates the networks in turn, each against the others'
current predictions; here all networks are updated in the same step against the predictions of the
same forward pass (a simultaneous update: one forward per network per step instead of K).

The peers train on the training workers: their gradients are averaged across ranks by the loop like
every method parameter, their BatchNorm statistics are broadcast from rank 0 before each forward (as
DDP does for the student), and they are checkpointed and resumed with the method's state. At the end
of the stage they are published in ``method.safetensors`` (keys ``peers.<i>.model.*``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, field_validator

from kd_cluster.methods.base import (Method, MethodConfig, Needs, SetupInfo, StepOutputs, check_arch, dist,
                                     mixed_cross_entropy, nn, register, soft_kl, torch)


class DMLConfig(MethodConfig):
    """Settings of ``dml``."""

    peers: list[str] = Field(min_length=1, description="Model names of the other students (the job's "
                             "student is the first); each is trained from scratch alongside it.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the mimicry KL (the paper: 1).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the mimicry KL (the paper: 1).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of every network's CE.")

    @field_validator("peers")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return [check_arch(a) for a in v]

    def needs(self) -> Needs:
        return Needs(teacher=False, labels=True)


def build_peer(arch: str, info: SetupInfo, taps: Sequence[str] = ()) -> nn.Module:
    """A freshly initialised peer network; with ``taps`` it returns ``(logits, {tap: feature})``."""
    from kd_cluster.models import TappedModel, build_model

    net = build_model(arch, num_classes=info.num_classes, in_chans=info.channels)
    return TappedModel(net, taps) if taps else net


def broadcast_from_rank0(module: nn.Module, params: bool = False) -> None:
    """Make every rank's buffers (BatchNorm statistics) rank 0's, as DDP does for the student before each
    forward; with ``params`` also the parameters (once, before the first step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*(module.parameters() if params else ()), *module.buffers()]:
            dist.broadcast(t.data, src=0)


class HitCounter:
    """Train-batch top-1 of some networks, accumulated on the device and read at log steps only."""

    def __init__(self) -> None:
        self.hits: torch.Tensor | None = None

    def add(self, logits: list[torch.Tensor], labels: torch.Tensor) -> None:
        h = torch.stack([(lg.detach().argmax(dim=1) == labels).sum() for lg in logits]
                        + [torch.tensor(labels.numel(), device=labels.device)])
        self.hits = h if self.hits is None else self.hits + h

    def read(self, names: list[str]) -> dict[str, float]:
        if self.hits is None:
            return {}
        *hits, n = self.hits.tolist()
        self.hits = None
        return {name: h / max(n, 1) for name, h in zip(names, hits, strict=True)}


def mutual_terms(logits: list[torch.Tensor], labels: torch.Tensor, lam: float, kl_weight: float,
                 temperature: float, label_smoothing: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(CE, weighted mean KL to the others' detached predictions) of each network."""
    out = []
    for k, lg in enumerate(logits):
        others = [o.detach() for j, o in enumerate(logits) if j != k]
        kl = torch.stack([soft_kl(lg, o, temperature) for o in others]).mean()
        out.append((mixed_cross_entropy(lg, labels, lam, label_smoothing), kl_weight * kl))
    return out


@register("dml")
class DML(Method):
    """Deep mutual learning of the job's student and the method's peers."""

    Config = DMLConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        self.peers = nn.ModuleList(build_peer(a, info) for a in self.cfg.peers)
        self._hits = HitCounter()
        self._synced = False

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        assert out.images is not None and out.student_logits is not None
        logits = [out.student_logits]
        for peer in self.peers:
            broadcast_from_rank0(peer, params=not self._synced)
            logits.append(peer(out.images).float())
        self._synced = True
        self._hits.add(logits[1:], out.labels)
        terms: dict[str, torch.Tensor] = {}
        cfg = self.cfg
        for k, (ce, kl) in enumerate(mutual_terms(logits, out.labels, out.lam, cfg.kl_weight, cfg.temperature,
                                                  cfg.label_smoothing)):
            prefix = "" if k == 0 else f"peer{k}_"
            terms[f"{prefix}ce"] = ce
            terms[f"{prefix}kl"] = kl
        return terms

    def metrics(self) -> dict[str, float]:
        """Each peer's top-1 on the training batches since the last log (the student's is in the evals)."""
        return self._hits.read([f"peer{k}_train_top1" for k in range(1, len(self.cfg.peers) + 1)])
