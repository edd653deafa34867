"""Contrastive representation distillation, CRD (Tian et al., ICLR 2020, arXiv 1910.10699).

Student and teacher features (pooled to vectors) are embedded by linear layers into ``feat_dim``
dimensions and L2-normalised (``v_s``, ``v_t``). Two memory banks hold one embedding per training
sample: ``memory_s`` (student embeddings) and ``memory_t`` (teacher embeddings), ``N x feat_dim`` each,
indexed by the per-sample index stored in the shards (``N`` = samples in the train split).

For every sample ``i`` of the batch, ``K`` negative indices are drawn uniformly from ``[0, N)``; with
the positive ``i`` first they index ``K + 1`` rows of a bank. Scores against the *other* model's bank:

    P_s[i, j] = exp(<v_s[i], memory_t[idx[i, j]]> / tau) / Z_s        (and P_t against memory_s)

``Z`` is the normalisation constant of the noise distribution, estimated once on the first step as
``N * mean(exp(score / tau))`` and then kept fixed, in a buffer (so it is checkpointed). The NCE loss
with noise probability ``Pn = 1/N`` and ``m = K`` (the authors' estimator):

    nce(P) = -mean_i [ log(P_i0 / (P_i0 + m Pn + e)) + sum_{j>=1} log(m Pn / (P_ij + m Pn + e)) ]

Loss = ``crd_weight * (nce(P_s) + nce(P_t)) + ce_weight * CE + kd_weight * T^2 KL`` (the authors'
CIFAR recipe: ``crd_weight 0.8, ce 1, kd 0``; ``kd_weight 1`` for CRD+KD). After the scores are taken,
each bank row of the batch moves towards the new embedding: ``row <- normalise(m * row + (1-m) * v)``
with momentum ``m = 0.5``.

Under DDP every rank holds both banks in full. The embeddings and indices of all ranks are gathered
(:func:`all_gather_cat`) and every rank applies the same update with the global batch, so the banks stay
identical on all ranks (the embedding layers' gradients are averaged by the loop). Negatives are drawn
per rank, from a generator seeded with ``(negatives_seed, step, rank)``: reproducible on resume and
different on each rank; they only shape each rank's loss, never the banks.

Memory: the two banks take ``2 x N x feat_dim x 4`` bytes on every rank's device, 1.02 GB per million
samples at ``feat_dim = 128`` (1.3 GB for ImageNet-1k), and the same again in each checkpoint and in the
stage's ``method.safetensors``. Each step also gathers ``B x (K+1) x feat_dim`` bank rows per bank
(64 x 16,385 x 128 x 4 bytes = 537 MB per bank at the CIFAR recipe's batch of 64).
"""

from __future__ import annotations

import math
import warnings

from pydantic import Field

from kd_cluster.methods._terms import CEKDConfig, ce_kd_terms, pooled
from kd_cluster.methods.base import F, Method, Needs, SetupInfo, StepOutputs, all_gather_cat, dist, nn, register, torch


class CRDConfig(CEKDConfig):
    """Settings of ``crd``."""

    student_layer: str = Field(description="Student feature tap, pooled to a vector (the penultimate, e.g. flatten).")
    teacher_layer: str = Field(description="Teacher feature tap, pooled to a vector.")
    feat_dim: int = Field(128, ge=1, description="Embedding width of both memory banks.")
    num_negatives: int = Field(16384, ge=1, description="Negatives K per sample (capped at N - 1).")
    nce_temperature: float = Field(0.07, gt=0.0, description="Temperature tau of the scores.")
    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="Memory-bank momentum.")
    crd_weight: float = Field(0.8, ge=0.0, description="Weight of the two NCE losses (their sum).")
    negatives_seed: int = Field(0, ge=0, description="Seed of the negative sampling (with the step and rank).")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, index=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


NCE_EPS = 1e-7


def nce_loss(p: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The NCE loss of scores ``p`` ``[B, K+1]`` (positive first) with uniform noise over ``num_samples``."""
    m = p.shape[1] - 1
    m_pn = m / num_samples
    log_pos = torch.log(p[:, 0] / (p[:, 0] + m_pn + NCE_EPS))
    log_neg = torch.log(m_pn / (p[:, 1:] + m_pn + NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


def momentum_update(bank: torch.Tensor, index: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
    """In place: ``bank[index] <- normalise(momentum * bank[index] + (1 - momentum) * v)``."""
    rows = bank.index_select(0, index).mul_(momentum).add_(v.detach(), alpha=1.0 - momentum)
    bank.index_copy_(0, index, F.normalize(rows, dim=1))


@register("crd")
class CRD(Method):
    """Contrastive distillation with student and teacher memory banks."""

    Config = CRDConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        s_dim = pooled(probe.student_features[self.cfg.student_layer]).shape[1]
        t_dim = pooled(probe.teacher_features[self.cfg.teacher_layer]).shape[1]
        d, n = self.cfg.feat_dim, info.num_samples
        if n < 2:
            raise ValueError(f"crd: the train split has {n} sample(s); contrastive negatives need at least 2")
        self.embed_s = nn.Linear(s_dim, d)
        self.embed_t = nn.Linear(t_dim, d)
        self.num_samples = n
        self.k = min(self.cfg.num_negatives, n - 1)
        if self.k < self.cfg.num_negatives:
            warnings.warn(f"crd: num_negatives {self.cfg.num_negatives} capped at {self.k} "
                          f"(the train split has {n} samples)", stacklevel=2)
        std = 1.0 / math.sqrt(d / 3)  # uniform init, then every row is overwritten as its sample is seen
        g = torch.Generator().manual_seed(self.cfg.negatives_seed)
        self.register_buffer("memory_s", torch.rand(n, d, generator=g).mul_(2 * std).add_(-std))
        self.register_buffer("memory_t", torch.rand(n, d, generator=g).mul_(2 * std).add_(-std))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._checked = False
        self._z_ready = False

    def _negatives(self, index: torch.Tensor, step: int) -> torch.Tensor:
        """``[B, K+1]`` bank rows: the sample itself, then K uniform draws from a (seed, step, rank) generator."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g = torch.Generator(device=index.device)
        g.manual_seed((self.cfg.negatives_seed * 1_000_003 + step) * 4099 + rank)
        neg = torch.randint(self.num_samples, (index.shape[0], self.k), generator=g, device=index.device)
        return torch.cat([index[:, None], neg], dim=1)

    def _scores(self, v: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = bank.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # [B, K+1, D]
        p = torch.exp(torch.bmm(w, v.unsqueeze(2)).squeeze(2) / self.cfg.nce_temperature)
        if not self._z_ready:  # first step of this process (one host sync): Z restored, or estimated now
            if z.item() < 0:  # the same estimate on every rank: the mean over all ranks' scores
                z.fill_(all_gather_cat(p.mean().detach().view(1)).mean().item() * self.num_samples)
        return p / z

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        index = out.index
        assert index is not None
        if not self._checked:  # once: the shards' indices must address the banks
            hi, lo = int(index.max()), int(index.min())
            if lo < 0 or hi >= self.num_samples:
                raise ValueError(f"crd: sample index {hi if hi >= self.num_samples else lo} is outside [0, "
                                 f"{self.num_samples}) (the train split's sample count); the shards' idx values "
                                 "must be 0..N-1 - rebuild them with `kd-cluster shards build`")
            self._checked = True
        v_s = F.normalize(self.embed_s(pooled(out.student_features[self.cfg.student_layer])), dim=1)
        v_t = F.normalize(self.embed_t(pooled(out.teacher_features[self.cfg.teacher_layer])), dim=1)
        rows = self._negatives(index, out.step)
        p_s = self._scores(v_s, self.memory_t, rows, self.z_s)
        p_t = self._scores(v_t, self.memory_s, rows, self.z_t)
        self._z_ready = True
        loss = nce_loss(p_s, self.num_samples) + nce_loss(p_t, self.num_samples)
        with torch.no_grad():
            all_index = all_gather_cat(index)
            momentum_update(self.memory_s, all_index, all_gather_cat(v_s), self.cfg.momentum)
            momentum_update(self.memory_t, all_index, all_gather_cat(v_t), self.cfg.momentum)
        return {"crd": self.cfg.crd_weight * loss} | ce_kd_terms(self.cfg, out)
