"""Placement ``stored``: the teacher's predictions were computed once, ahead of training, and are replayed.

A label set of every class's logit (``teacher label --logits``) gives the method the teacher's logits themselves
(stored in float16); a top-N one gives the log of the distribution rebuilt below.

``kd-cluster teacher label`` runs the teacher over K augmentation views of every training sample and stores
the views' crop boxes and flips with the teacher's top-N probabilities (``kd_cluster.data.soft_labels``). In
training, the stream replays one of the K crops per sample and pass, and this teacher turns the stored top-N
into a full distribution on the device. No teacher network is loaded, on any worker.

The probability mass the stored top-N leave out, ``1 - sum(top-N)``, is spread uniformly over the other
``C - N`` classes rather than renormalised away: a renormalised target gives the tail classes zero probability,
which a temperature above 1 (KD's T = 4) can no longer soften, and a zero probability has no finite logit;
spread evenly, the target keeps the teacher's top-N exactly and a bounded, near-true tail.
"""

from __future__ import annotations

import torch

from kd_cluster.teacher.base import (MemberPlan, StepInput, Teacher, TeacherContext, TeacherEval, TeacherOutputs,
                                     TeacherPlan, View)


def dense_distribution(probs: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full distributions ``[B, C]`` from top-N probabilities ``[B, N]`` and their classes; the missing mass
    spread uniformly over the other classes."""
    probs = probs.float()
    n = probs.shape[1]
    rest = (1.0 - probs.sum(dim=1, keepdim=True)).clamp_min(0.0) / max(num_classes - n, 1)
    out = rest.expand(-1, num_classes).clone() if num_classes > n else torch.zeros(
        probs.shape[0], num_classes, device=probs.device)
    return out.scatter_(1, classes.long(), probs)


class StoredTeacher(Teacher):
    """The teacher's stored predictions on the replayed crops, as log-probabilities (the method's logits)."""

    reads_views = False
    evaluates = False

    def __init__(self, plan: TeacherPlan, device: torch.device) -> None:
        from kd_cluster.data import DataError, read_labels
        from kd_cluster.data.soft_labels import StoredViews, label_mismatches
        from kd_cluster.models import weights_sha256
        from kd_cluster.storage import storage_options

        assert plan.labels is not None, "the planner gives placement stored its labels"
        opts = storage_options(plan.labels, plan.endpoint_url)
        labels = read_labels(plan.labels, opts)
        if plan.label_expect:  # labels an earlier stage stored were not there to check when the job was planned
            expect = plan.label_expect
            shas = [weights_sha256(w, storage_options=storage_options(w, plan.endpoint_url)) if w else None
                    for w in expect["weights"]]
            wrong = label_mismatches(labels.config, {**expect, "weights_sha256": shas}, plan.labels)
            if wrong:
                raise DataError("; ".join(wrong))
        self.view_source = StoredViews(labels, seed=plan.seed, storage_options=opts)
        self.num_classes = plan.num_classes
        self.device = device

    def train_views(self, kind: View) -> tuple[str, ...]:
        return ("aug",)  # the stored crop; there is no second view to send anywhere

    def step(self, inp: StepInput) -> TeacherOutputs:
        b = inp.batch
        if "soft_logits" in b:  # a label set of every class's logit: the teacher's logits as they were
            return b["soft_logits"].to(self.device, non_blocking=True).float(), {}
        p = dense_distribution(b["soft_probs"].to(self.device, non_blocking=True),
                               b["soft_classes"].to(self.device, non_blocking=True), self.num_classes)
        return torch.log(p.clamp_min(torch.finfo(torch.float32).tiny)), {}

    def probe(self, x: torch.Tensor) -> TeacherOutputs:
        return torch.zeros(x.shape[0], self.num_classes, device=x.device), {}

    def evaluate(self, x: torch.Tensor, raw: torch.Tensor) -> TeacherEval:  # pragma: no cover - evaluates False
        raise AssertionError("stored labels cover the training split only")


def build_stored(plan: TeacherPlan, ctx: TeacherContext, member: MemberPlan) -> Teacher:
    """The builder of ``placement: stored`` (one teacher whatever its members were: the labels hold its output)."""
    return StoredTeacher(plan, ctx.device)


__all__ = ["StoredTeacher", "build_stored", "dense_distribution"]
