"""SSKD (Xu et al., ECCV 2020, arXiv 2006.07114): knowledge distillation meets self-supervision.

Every image of a batch also appears rotated by 90, 180 and 270 degrees (the transforms of the authors'
code), so student and teacher see four views per image; :meth:`SSKD.expand` builds that batch with
the views of one image next to each other (rows ``4i .. 4i+3``, row ``4i`` the original).

Two phases, run as two stages of a job:

``phase: head`` trains a 2-layer MLP head on the frozen teacher's pooled feature with a contrastive
  task: for each rotated view, the cosine similarities of its head output to the head outputs of the
  batch's originals are logits whose target is its own source image. Only the head trains
  (``student=False``); it is published in the stage's ``method.safetensors``.
``phase: student`` (``init: stage:<head stage>``): the student gets a head of the same kind (fresh),
  the teacher's head is loaded and frozen, and the loss is

      ce_weight * CE(originals) + kd_weight * T_kd^2 KL(originals)
      + tf_weight * T_tf^2 KL(rotated views, kept rows) + ss_weight * T_ss^2 KL(similarity rows, kept rows)

  where the similarity rows are the softened (3B x B) similarity matrices of student and teacher.
  The teacher's wrong predictions are filtered as in the authors' code: the rank of the true label
  (for the similarity rows: of the true source) in the teacher's output is computed per row; every
  row the teacher gets right (rank 0) is kept, and of the wrong ones the ``keep`` fraction with the
  smallest ranks (``floor(n_wrong * keep)`` rows, ties in row order).

Defaults are the authors' code's (weights 0.1/0.9/2.7/10, temperatures 4/4/0.5, keep 1.0/0.75). Mixup
must be off: the similarity task needs each view's source to be one image.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd_cluster.methods.base import F, Method, MethodConfig, Needs, SetupInfo, StepOutputs, nn, register, torch


class SSKDConfig(MethodConfig):
    """Settings of ``sskd``."""

    phase: Literal["head", "student"] = Field("student", description="'head': train the teacher's "
                                              "self-supervision head on the frozen teacher (a stage of its "
                                              "own); 'student': distill, with the head from init: stage:<head stage>.")
    teacher_layer: str = Field("flatten", description="Feature tap of the teacher's pooled feature (the "
                               "input of its classifier).")
    student_layer: str = Field("flatten", description="Feature tap of the student's pooled feature.")
    ce_weight: float = Field(0.1, ge=0, description="Weight of the label CE on the originals.")
    kd_weight: float = Field(0.9, ge=0, description="Weight of the KD term on the originals.")
    tf_weight: float = Field(2.7, ge=0, description="Weight of the KD term on the rotated views.")
    ss_weight: float = Field(10.0, ge=0, description="Weight of the similarity-matrix KL.")
    kd_temperature: float = Field(4.0, gt=0, description="Temperature of the KD term on the originals.")
    tf_temperature: float = Field(4.0, gt=0, description="Temperature of the KD term on the rotated views.")
    ss_temperature: float = Field(0.5, gt=0, description="Temperature of the similarity-matrix KL.")
    tf_keep: float = Field(1.0, ge=0, le=1, description="Fraction of the rotated views the teacher "
                           "classifies wrongly that are kept (those whose true label ranks highest).")
    ss_keep: float = Field(0.75, ge=0, le=1, description="Fraction of the similarity rows the teacher's "
                           "head gets wrong that are kept (those whose true source ranks highest).")

    def needs(self) -> Needs:
        if self.phase == "head":
            return Needs(teacher=True, student=False, teacher_features=(self.teacher_layer,))
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


VIEWS = 4
"""The original and its rotations by 90, 180 and 270 degrees."""


def rotate_views(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (4B, C, H, W): each image followed by its rotations by 90, 180 and 270 degrees."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"sskd rotates images by 90 degrees and needs square crops, got {tuple(x.shape[-2:])}")
    views = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(VIEWS)], dim=1)
    return views.reshape(-1, *x.shape[1:])


def split_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of an expanded batch -> (originals (B, ...), rotated views (3B, ...) in image-major order)."""
    v = t.reshape(-1, VIEWS, *t.shape[1:])
    return v[:, 0], v[:, 1:].reshape(-1, *t.shape[1:])


def similarity(rep: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each rotated view's representation (rows, 3B) to each original's (columns, B)."""
    nor, aug = split_views(rep.flatten(1))
    return F.normalize(aug, dim=1) @ F.normalize(nor, dim=1).t()


def source_targets(batch: int, device: torch.device) -> torch.Tensor:
    """The source image of each rotated-view row: 0, 0, 0, 1, 1, 1, ..."""
    return torch.arange(batch, device=device).repeat_interleave(VIEWS - 1)


def keep_mask(scores: torch.Tensor, target: torch.Tensor, keep: float) -> torch.Tensor:
    """Which rows to distil from: every row whose target is the top score, plus the ``floor(n_wrong * keep)``
    wrong rows whose target ranks highest (ties in row order). No host sync."""
    rank = (scores > scores.gather(1, target[:, None])).sum(dim=1)  # 0 = the target is the top score
    order = torch.sort(rank, stable=True).indices
    n_wrong = (rank > 0).sum()
    n_keep = (rank.numel() - n_wrong) + torch.floor(n_wrong.double() * keep).long()
    kept_sorted = torch.arange(rank.numel(), device=rank.device) < n_keep
    return torch.zeros_like(kept_sorted).scatter(0, order, kept_sorted)


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              mask: torch.Tensor) -> torch.Tensor:
    """T^2 * mean over the kept rows of KL(softmax(t/T) || softmax(s/T)); 0 when no row is kept."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    m = mask.to(rows.dtype)
    return (rows * m).sum() / m.sum().clamp(min=1.0) * temperature**2


def projection_head(dim: int) -> nn.Sequential:
    """The 2-layer MLP head of the self-supervision task (width = the feature's)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


@register("sskd")
class SSKD(Method):
    """Self-supervised views + similarity-matrix distillation with filtered teacher errors."""

    Config = SSKDConfig

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        self.t_head = projection_head(probe.teacher_features[self.cfg.teacher_layer].flatten(1).shape[1])
        if self.cfg.phase == "student":
            self.t_head.requires_grad_(False)  # trained by the head stage, frozen here
            self.s_head = projection_head(probe.student_features[self.cfg.student_layer].flatten(1).shape[1])
        self._ss_hits: torch.Tensor | None = None

    def train(self, mode: bool = True) -> SSKD:
        super().train(mode)
        if self.cfg.phase == "student" and hasattr(self, "t_head"):
            self.t_head.eval()
        return self

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_views(x)

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if out.lam < 1.0:
            raise ValueError("method sskd: mixup must be off (augment.mixup_alpha: 0): each rotated view "
                             "must come from one image")
        cfg = self.cfg
        t_sim = similarity(self.t_head(out.teacher_features[cfg.teacher_layer].flatten(1)))
        src = source_targets(t_sim.shape[1], t_sim.device)
        if cfg.phase == "head":
            self._count_hits(t_sim, src)
            return {"ss_head": F.cross_entropy(t_sim, src)}
        assert out.student_logits is not None and out.teacher_logits is not None
        s_nor, s_aug = split_views(out.student_logits)
        t_nor, t_aug = split_views(out.teacher_logits)
        s_sim = similarity(self.s_head(out.student_features[cfg.student_layer].flatten(1)))
        self._count_hits(s_sim.detach(), src)
        t_sim = t_sim.detach()
        aug_labels = out.labels.repeat_interleave(VIEWS - 1)
        tf_mask = keep_mask(t_aug, aug_labels, cfg.tf_keep)
        ss_mask = keep_mask(t_sim, src, cfg.ss_keep)
        ones = torch.ones(s_nor.shape[0], dtype=torch.bool, device=s_nor.device)
        return {
            "ce": cfg.ce_weight * F.cross_entropy(s_nor, out.labels),
            "kd": cfg.kd_weight * masked_kl(s_nor, t_nor, cfg.kd_temperature, ones),
            "tf": cfg.tf_weight * masked_kl(s_aug, t_aug, cfg.tf_temperature, tf_mask),
            "ss": cfg.ss_weight * masked_kl(s_sim, t_sim, cfg.ss_temperature, ss_mask),
        }

    def _count_hits(self, sim: torch.Tensor, src: torch.Tensor) -> None:
        hits = torch.stack([(sim.argmax(dim=1) == src).sum(), torch.tensor(src.numel(), device=src.device)])
        self._ss_hits = hits if self._ss_hits is None else self._ss_hits + hits

    def metrics(self) -> dict[str, float]:
        """Top-1 of the self-supervision task (which original a rotated view comes from) since the last log."""
        if self._ss_hits is None:
            return {}
        hit, n = self._ss_hits.tolist()
        self._ss_hits = None
        name = "ss_head_top1" if self.cfg.phase == "head" else "ss_student_top1"
        return {name: hit / max(n, 1)}
