"""Teacher ensembles: several frozen networks whose predictions are averaged in probability space.

Each member is built by the stage's placement (all on the training worker with ``colocated``; a pool of
actors per member with ``actors``, each request of a step sent to every member at once). The ensemble's
output, for every method that reads teacher logits, is ``log(sum_i w_i softmax(z_i))`` with the member
weights ``w_i`` normalised to sum to one: the log of the averaged distribution, so that a softmax of it gives
back the average (at a temperature T, ``softmax(log(p) / T)`` sharpens or softens that average). Feature taps
come from the one member named by ``teacher.features_from``.

Metrics: per member, the fraction of training samples on which its top class equals the ensemble's
(``teacher/<member>/agreement``, this worker's batches of the log window) and, at evaluations, its top-1
(``eval/teacher/<member>_top1``, next to the ensemble's ``eval/teacher_top1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from kd_cluster.teacher.base import Batch, StepInput, Teacher, TeacherEval, TeacherOutputs


def combine(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``log(sum_i w_i softmax(logits_i))`` with ``w`` normalised; float32."""
    total = float(sum(weights))
    p = sum((w / total) * torch.softmax(z.float(), dim=1) for z, w in zip(logits, weights, strict=True))
    return torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))


class EnsembleTeacher(Teacher):
    """Members built by one placement, combined on the training worker (identically for every placement)."""

    def __init__(self, members: dict[str, Teacher], weights: dict[str, float], features_from: str | None,
                 device: torch.device) -> None:
        assert members and set(members) == set(weights), "every member needs a weight"
        assert features_from is None or features_from in members
        self.members = members
        self.member_names = tuple(members)
        self.weights = [weights[n] for n in self.member_names]
        self.features_from = features_from
        self.device = device
        self._agree = torch.zeros(len(members), device=device)
        self._seen = 0

    def _combine(self, outs: list[TeacherOutputs]) -> TeacherOutputs:
        logits = combine([o[0] for o in outs], self.weights)
        feats = outs[self.member_names.index(self.features_from)][1] if self.features_from else {}
        return logits, feats

    def feed(self, batches: Iterator[Batch], lam_of_step: Callable[[int], float]) -> Iterator[Batch]:
        for m in self.members.values():
            batches = m.feed(batches, lam_of_step)
        return self._drop_remote_view(batches)

    def _drop_remote_view(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Members that compute elsewhere have sent the second view; do not carry it to the device too."""
        drop = not any(m.reads_views for m in self.members.values())
        for b in batches:
            if drop:
                b.pop("image_t", None)
            yield b

    def step(self, inp: StepInput) -> TeacherOutputs:
        outs = [m.step(inp) for m in self.members.values()]
        logits, feats = self._combine(outs)
        top = logits.argmax(1)
        self._agree += torch.stack([(o[0].argmax(1) == top).float().sum() for o in outs])
        self._seen += int(top.shape[0])
        return logits, feats

    def probe(self, x: torch.Tensor) -> TeacherOutputs:
        return self._combine([m.probe(x) for m in self.members.values()])

    def evaluate(self, x: torch.Tensor, raw: torch.Tensor) -> TeacherEval:
        each = {n: m.evaluate(x, raw).logits for n, m in self.members.items()}
        return TeacherEval(combine(list(each.values()), self.weights), each)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.members.values():
            for k, v in m.metrics().items():  # actor figures per member pool
                out[k.replace("teacher/", f"teacher/{self._name_of(m)}/", 1)] = v
        if self._seen:
            for name, a in zip(self.member_names, (self._agree / self._seen).tolist(), strict=True):
                out[f"teacher/{name}/agreement"] = a
        self._agree.zero_()
        self._seen = 0
        return out

    def _name_of(self, member: Teacher) -> str:
        return next(n for n, m in self.members.items() if m is member)

    def close(self) -> None:
        for m in self.members.values():
            m.close()


__all__ = ["EnsembleTeacher", "combine"]
