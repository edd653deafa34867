"""``kd-cluster plan``: how to split N GPUs between training workers and teacher actors, from measured rates.

Inputs, all in images per second:

- ``S``: one GPU running student steps alone (``bench teacher``'s "student step alone");
- ``T``: one GPU running teacher forwards alone (one teacher replica);
- ``C``: one GPU running both, the teacher colocated (measured by ``bench teacher --no-ray``; when unknown,
  ``1 / (1/S + 1/T)``: the two share the GPU's time and neither overlaps the other);
- ``G`` (GPU decode only): one GPU decoding and cropping the batches (the decode step takes GPU time from the
  training worker; infinite when not measured);
- ``D``: images one CPU core feeds per second with the job's decode (``bench data``: the shard stream's images
  per CPU-second with CPU decode, or the loader that only reads bytes and draws the crop parameters with GPU
  decode).

With ``N`` GPUs, the candidates and their end-to-end rate:

- colocated: every GPU is a training worker with its own teacher, ``N x C'``;
- split ``W`` (1 <= W < N): ``W`` training workers fed by ``N - W`` teacher actors (one GPU each),
  ``min(W x S', (N - W) x T)``: the slower side sets the pace (teacher requests are pipelined, so the two
  overlap; the transfer of uint8 crops and logits is assumed to be hidden);

where ``S' = 1 / (1/S + 1/G)`` and ``C' = 1 / (1/C + 1/G)`` with GPU decode (``S' = S``, ``C' = C`` with CPU
decode). With ``cpus`` CPU cores for the loaders, every candidate is also capped at ``cpus x D`` (the data
bound). The plan is the candidate with the highest rate; the loader cores it needs per training worker are
``ceil(rate per worker / D)``, and an epoch of ``M`` samples takes ``M / rate`` seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

# Images per CPU-second of the loader at 224 px from 500x375 JPEGs, measured side by side by `kd-cluster bench data`
# on this project's 2-core VM (load average ~36): the shard stream (cpu) and the loader of decode: gpu (gpu).
# Used when no `bench data --save` result is given.
DEFAULT_DECODE_PER_CORE = {"cpu": 348.0, "gpu": 1626.0}


@dataclass(frozen=True)
class Rates:
    """Measured rates of one GPU (images/s) and of one loader core."""

    student: float
    """``S``: student steps alone."""
    teacher: float
    """``T``: teacher forwards alone (one replica)."""
    colocated: float | None = None
    """``C``: student steps with the teacher on the same GPU; None: ``1 / (1/S + 1/T)``."""
    gpu_decode: float | None = None
    """``G``: GPU decode alone (decode: gpu); None: not measured, taken as free."""
    decode_per_core: float = DEFAULT_DECODE_PER_CORE["cpu"]
    """``D``: images one loader core feeds per second with the job's decode."""

    def __post_init__(self) -> None:
        for name in ("student", "teacher", "decode_per_core"):
            if not getattr(self, name) > 0:
                raise ValueError(f"rate {name} must be > 0 images/s, got {getattr(self, name)}")
        for name in ("colocated", "gpu_decode"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"rate {name} must be > 0 images/s, got {v}")

    @property
    def colocated_rate(self) -> float:
        """``C``, measured or from ``S`` and ``T``."""
        return self.colocated if self.colocated is not None else 1.0 / (1.0 / self.student + 1.0 / self.teacher)

    def with_decode(self, rate: float) -> float:
        """A training worker's rate once the GPU decode step takes its share of the GPU."""
        return rate if self.gpu_decode is None else 1.0 / (1.0 / rate + 1.0 / self.gpu_decode)


@dataclass(frozen=True)
class Candidate:
    """One way to use the GPUs."""

    workers: int
    """GPUs that run training workers (``resources.num_workers``)."""
    teacher_gpus: int
    """GPUs that run teacher actors (``teacher.replicas`` with ``num_gpus: 1``); 0: the teacher is colocated."""
    images_per_s: float
    bound: Literal["colocated", "student", "teacher", "data"]
    """What sets the pace."""

    @property
    def placement(self) -> str:
        return "colocated" if self.teacher_gpus == 0 else "actors"


@dataclass
class Plan:
    """The best candidate and what it needs."""

    gpus: int
    decode: str
    best: Candidate
    candidates: list[Candidate]
    cores_per_worker: int
    """Loader cores each training worker needs to feed its share: ``ceil(rate / W / D)``."""
    epoch_s: float | None
    """Predicted seconds per epoch (None: sample count unknown)."""
    rates: Rates
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "decode": self.decode, "placement": self.best.placement,
                "workers": self.best.workers, "teacher_gpus": self.best.teacher_gpus,
                "images_per_s": self.best.images_per_s, "bound": self.best.bound,
                "cores_per_worker": self.cores_per_worker, "epoch_s": self.epoch_s,
                "rates": {"student": self.rates.student, "teacher": self.rates.teacher,
                          "colocated": self.rates.colocated_rate, "gpu_decode": self.rates.gpu_decode,
                          "decode_per_core": self.rates.decode_per_core},
                "candidates": [{"workers": c.workers, "teacher_gpus": c.teacher_gpus,
                                "images_per_s": c.images_per_s, "bound": c.bound} for c in self.candidates]}


def candidates(rates: Rates, gpus: int, cpus: int | None = None) -> list[Candidate]:
    """Every way to use ``gpus`` GPUs (colocated first, then each split), with its end-to-end images/s."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if cpus is not None and cpus < 1:
        raise ValueError(f"--cpus must be >= 1, got {cpus}")
    cap = math.inf if cpus is None else cpus * rates.decode_per_core
    out = []
    coloc = gpus * rates.with_decode(rates.colocated_rate)
    out.append(Candidate(gpus, 0, min(coloc, cap), "data" if cap < coloc else "colocated"))
    student = rates.with_decode(rates.student)
    for w in range(1, gpus):
        s_side, t_side = w * student, (gpus - w) * rates.teacher
        rate = min(s_side, t_side, cap)
        bound = "data" if cap < min(s_side, t_side) else ("student" if s_side <= t_side else "teacher")
        out.append(Candidate(w, gpus - w, rate, bound))
    return out


def plan(rates: Rates, gpus: int, *, decode: str = "cpu", cpus: int | None = None,
         samples: int | None = None) -> Plan:
    """The candidate with the highest images/s (ties: fewer teacher GPUs), the loader cores it needs per
    training worker, and the epoch time for ``samples`` images."""
    cands = candidates(rates, gpus, cpus)
    best = max(cands, key=lambda c: (c.images_per_s, -c.teacher_gpus))
    per_worker = best.images_per_s / best.workers
    notes = []
    if decode == "gpu" and rates.gpu_decode is None:
        notes.append("GPU decode time not measured (give --gpu-decode-rate): taken as free")
    return Plan(gpus=gpus, decode=decode, best=best, candidates=cands,
                cores_per_worker=max(1, math.ceil(per_worker / rates.decode_per_core - 1e-9)),
                epoch_s=samples / best.images_per_s if samples else None, rates=rates, notes=notes)


def format_plan(p: Plan) -> str:
    """The plan as text: every candidate, then the chosen one and the job settings for it."""
    r = p.rates
    lines = [f"rates per GPU: student S {r.student:.1f}, teacher T {r.teacher:.1f}, colocated C {r.colocated_rate:.1f}"
             + ("" if r.colocated is not None else " (1/(1/S+1/T))")
             + (f", GPU decode G {r.gpu_decode:.1f}" if r.gpu_decode else "")
             + f" images/s; loader {r.decode_per_core:.0f} images/s per core ({p.decode} decode)",
             f"{'training workers':>17} {'teacher GPUs':>13} {'images/s':>10}  bound"]
    for c in p.candidates:
        mark = "  <- best" if c == p.best else ""
        lines.append(f"{c.workers:>17} {c.teacher_gpus if c.teacher_gpus else 'colocated':>13} "
                     f"{c.images_per_s:>10.1f}  {c.bound}{mark}")
    b = p.best
    settings = (f"resources.num_workers={b.workers} teacher.placement=colocated" if b.teacher_gpus == 0 else
                f"resources.num_workers={b.workers} teacher.placement=actors teacher.replicas={b.teacher_gpus} "
                "teacher.num_gpus=1")
    lines.append(f"plan for {p.gpus} GPUs: {settings}")
    lines.append(f"  {b.images_per_s:.1f} images/s end to end; {p.cores_per_worker} loader cores per training worker "
                 f"({p.decode} decode)")
    lines.append(f"  epoch: {p.epoch_s:.0f} s ({p.epoch_s / 3600:.2f} h)" if p.epoch_s is not None else
                 "  epoch: unknown sample count (give --samples, or a job whose train manifest can be opened)")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def gpu_rates(stage: Any, *, rates: str | None = None, bench_file: str | None = None,
              measure_steps: int = 10) -> tuple[dict[str, float | None], list[str]]:
    """Student, teacher and colocated rates of one GPU for a stage: given (``rates``: "S,T" or "S,T,C"), from a
    ``bench teacher --save`` file, or measured here (briefly, on this machine's device)."""
    import json
    from pathlib import Path

    if rates:
        try:
            vals = [float(v) for v in rates.split(",")]
        except ValueError:
            vals = []
        if len(vals) not in (2, 3):
            raise ValueError(f"--rates {rates!r}: give S,T or S,T,C (images/s per GPU: student step, teacher "
                             "forward, both colocated)")
        return {"student": vals[0], "teacher": vals[1], "colocated": vals[2] if len(vals) == 3 else None}, []
    if bench_file:
        try:
            res = json.loads(Path(bench_file).read_text())
            colocated = next((v for k, v in res.get("medians", {}).items() if k.startswith("colocated")), None)
            return {"student": float(res["student_rate"]), "teacher": float(res["teacher_rate"]),
                    "colocated": colocated}, []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--bench {bench_file}: not a `kd-cluster bench teacher --save` result ({exc})") from None
    import torch

    from kd_cluster.bench import teacher_rates as bench
    from kd_cluster.bench.teacher import setup_for

    b = setup_for(stage, batch=None, steps=measure_steps, warmup=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    note = (f"rates measured here on the {dev} ({measure_steps} steps each; `bench teacher --save` on the GPU machine "
            "gives steadier ones)")
    return {"student": bench.student_rate(b), "teacher": bench.teacher_rate(b), "colocated": bench.colocated_rate(b)}, [note]


def decode_rate(decode: str, data_bench: str | None) -> tuple[float, list[str]]:
    """Images one loader core feeds per second with ``decode``: from a ``bench data --save`` file, else this
    project's own figure (:data:`DEFAULT_DECODE_PER_CORE`)."""
    import json
    from pathlib import Path

    if not data_bench:
        return DEFAULT_DECODE_PER_CORE[decode], [f"loader rate per core: this project's `bench data` figure for "
                                                 f"{decode} decode (give --data-bench with your own)"]
    key = "trainstream_img_per_cpu_s" if decode == "cpu" else "gpu_loader_img_per_cpu_s"
    try:
        return float(json.loads(Path(data_bench).read_text())[key]), []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--data-bench {data_bench}: not a `kd-cluster bench data --save` result with {key!r} "
                         f"({exc})") from None


def plan_stage(stage: Any, gpus: int, *, rates: str | None = None, bench_file: str | None = None,
               data_bench: str | None = None, gpu_decode: float | None = None, cpus: int | None = None,
               samples: int | None = None, measure_steps: int = 10) -> Plan:
    """``kd-cluster plan``: the best split of ``gpus`` for a stage (a ``StagePlan`` with a teacher), its rates
    given, read from benchmark results or measured here; the epoch from the train manifest's sample count
    unless ``samples`` is given."""
    decode = stage.spec.data.decode
    measured, notes = gpu_rates(stage, rates=rates, bench_file=bench_file, measure_steps=measure_steps)
    per_core, more = decode_rate(decode, data_bench)
    r = Rates(**measured, gpu_decode=gpu_decode, decode_per_core=per_core)
    if samples is None:
        from kd_cluster.data import load_manifest

        try:
            samples = load_manifest(stage.train_manifest).num_samples
        except Exception:  # noqa: BLE001 - a remote manifest we may not reach from here: epoch time unknown
            samples = None
    result = plan(r, gpus, decode=decode, cpus=cpus, samples=samples)
    result.notes = notes + more + result.notes
    return result


__all__ = ["DEFAULT_DECODE_PER_CORE", "Candidate", "Plan", "Rates", "candidates", "decode_rate", "format_plan",
           "gpu_rates", "plan", "plan_stage"]
