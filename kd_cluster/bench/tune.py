"""`kd-cluster bench tune`: choose a job's settings on the validation split, every probe a run with a results row.

A search space file (YAML) names the job and either ``factors`` (dotted settings with the values to try, the
job's own value first) or an explicit list of ``probes`` (each a set of overrides). With factors the search is a
fixed coordinate search, decided before any probe runs:

1. the job as it is;
2. each factor's other values, one factor at a time;
3. when two or more factors improved on the job: the best value of every improving factor together, and that
   combination with each of them left at the job's value (so each choice is checked in the company of the others).

The chosen settings are those of the probe with the best val top-1 (ties: fewer changes). ``steps_factor`` is a
factor too: the schedule's length as a multiple of the budget. Every probe trains with the same seed and data order
as the benchmark's runs; the probes, the chosen settings and a table go to ``probes.csv``, ``chosen.json`` and
``tune.md``. Runs already finished are reused, so a search can be continued or extended.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_cluster.bench.fidelity import (AUX_STAGES, NO_TEACHER, Cell, FidelityError,
                                       check_fresh, loss_terms, own_images_top1, run_cell, run_overrides, run_prefix,
                                       shown_path, split_url, student_overrides)

STEPS = "steps_factor"


@dataclass
class Probe:
    """One point of the search: the settings it changes (dotted key -> value) and what it gave."""

    changes: dict[str, Any]
    round: int
    cell: Cell | None = None
    own_top1: float = math.nan
    """Top-1 on the images the run trained on (clean centre crops): how tightly it fits them."""

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={_text(v)}" for k, v in self.changes.items()) or "(the job as it is)"


def _text(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


@dataclass
class Space:
    """A search space file: the job (relative to the file) and its factors or probes."""

    path: Path
    job: str
    factors: dict[str, list[Any]] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)
    why: str = ""


def load_space(path: str | Path) -> Space:
    """Read and check a search space file (one-line errors naming the file and the key)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FidelityError(f"{p}: cannot be read as YAML ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("job"), str):
        raise FidelityError(f"{p}: expected a mapping with 'job' (a job file, relative to this file)")
    factors, probes = doc.get("factors") or {}, doc.get("probes") or []
    if bool(factors) == bool(probes):
        raise FidelityError(f"{p}: give either 'factors' (a coordinate search) or 'probes' (a list), not both")
    if not isinstance(factors, dict) or any(not isinstance(v, list) or len(v) < 2 for v in factors.values()):
        raise FidelityError(f"{p}: factors: each maps a dotted setting to a list of >= 2 values, the job's own first")
    if not isinstance(probes, list) or any(not isinstance(x, dict) for x in probes):
        raise FidelityError(f"{p}: probes: a list of mappings, each a dotted setting -> value")
    unknown = set(doc) - {"job", "factors", "probes", "why"}
    if unknown:
        raise FidelityError(f"{p}: unknown keys {sorted(unknown)}; allowed: job, factors, probes, why")
    job = (p.parent / doc["job"]).resolve()
    if not job.is_file():
        raise FidelityError(f"{p}: job {doc['job']!r}: no such file ({job})")
    return Space(p, str(job), factors, probes, str(doc.get("why") or ""))


def _overrides(changes: dict[str, Any]) -> list[str]:
    return [f"{k}={_text(v)}" for k, v in changes.items() if k != STEPS]


def _digest(changes: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:8]


def probe_cell(space: Space, probe: Probe, *, budget: int, seed: int, runs: str, train: str, val: str,
               prefix: str, student: str | None, teacher_weights: str | None) -> Cell:
    """The run of one probe: the benchmark's overrides for the job's method, then the probe's changes."""
    from kd_cluster.config import load_job

    method = load_job(space.job).method.name
    kind = Path(space.job).stem
    steps = max(1, round(budget * float(probe.changes.get(STEPS, 1.0))))
    run = f"{prefix}-tune-{kind}-{_digest(probe.changes)}-b{budget}-s{seed}"
    over = run_overrides(run, seed, steps, runs, train, val) + student_overrides(kind, student)
    if method not in ("supervised", *NO_TEACHER):
        assert teacher_weights is not None
        over.append(f"teacher.weights={teacher_weights}")
    if kind in AUX_STAGES:
        aux, aux_steps = AUX_STAGES[kind], max(1, budget // 5)
        over += [f"stages.{aux}.set.schedule.steps={aux_steps}",
                 f"stages.{aux}.set.schedule.warmup_steps={max(0, aux_steps // 20)}"]
    return Cell(kind, seed, budget, run, shown_path(space.job), over + _overrides(probe.changes), steps=steps)


def plan_rounds(space: Space) -> list[Probe]:
    """Rounds 0 and 1 of a factor search (or every listed probe)."""
    if space.probes:
        return [Probe(dict(p), 0) for p in space.probes]
    out = [Probe({}, 0)]
    for key, values in space.factors.items():
        out += [Probe({key: v}, 1) for v in values[1:]]
    return out


def combination_round(space: Space, done: list[Probe]) -> list[Probe]:
    """Round 2, from rounds 0 and 1: every improving factor at its best value, and that set less each one."""
    base = next(p for p in done if not p.changes)
    best: dict[str, Any] = {}
    for key in space.factors:
        tried = [p for p in done if list(p.changes) == [key] and p.cell is not None]
        top = max(tried, key=lambda p: p.cell.top1, default=None)
        if top is not None and top.cell.top1 > base.cell.top1:
            best[key] = top.changes[key]
    if len(best) < 2:
        return []
    combos = [dict(best)] + [{k: v for k, v in best.items() if k != drop} for drop in best]
    seen = {json.dumps(p.changes, sort_keys=True) for p in done}
    out = []
    for c in combos:
        if json.dumps(c, sort_keys=True) not in seen:
            seen.add(json.dumps(c, sort_keys=True))
            out.append(Probe(c, 2))
    return out


def best_probe(probes: list[Probe]) -> Probe:
    """The chosen probe: the best val top-1; of equals, the one with the fewest changes (then the earliest)."""
    return max(probes, key=lambda p: (p.cell.top1, -len(p.changes), -probes.index(p)))


def write_probes(probes: list[Probe], path: Path) -> None:
    best = best_probe(probes)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["probe", "round", "changes", "steps", "val_top1", "own_images_top1", "wall_s", "reused", "run",
                    "loss_terms", "command", "chosen"])
        for i, p in enumerate(probes):
            c = p.cell
            assert c is not None
            terms = " ".join(f"{k}={v:.4g}" for k, v in sorted(loss_terms(c.metrics).items()))
            w.writerow([i, p.round, p.name, c.steps, f"{c.top1:.6f}", "" if math.isnan(p.own_top1) else
                        f"{p.own_top1:.6f}", f"{c.wall_s:.1f}", int(c.skipped), c.run, terms,
                        " ".join(["kd-cluster", "run", c.job, "--no-ray", *c.overrides]), int(p is best)])


def read_probes(path: Path) -> list[dict[str, str]]:
    """The rows of a ``probes.csv``."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def probes_table(rows: list[dict[str, str]]) -> str:
    """A ``probes.csv`` as a markdown table (the chosen probe in bold)."""
    out = ["| # | round | changes | steps | val top-1 | own images top-1 | loss terms at the end |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        top = f"**{float(r['val_top1']):.4f}**" if r["chosen"] == "1" else f"{float(r['val_top1']):.4f}"
        own = f"{float(r['own_images_top1']):.4f}" if r["own_images_top1"] else "-"
        out.append(f"| {r['probe']} | {r['round']} | {r['changes']} | {r['steps']} | {top} | {own} | "
                   f"{r['loss_terms']} |")
    return "\n".join(out)


def run_tune(*, space: Space, out: Path, budget: int, seed: int = 0, dataset: str = "fashion-mnist",
             eval_split: str = "val", train_split: str = "train", student: str | None = None,
             teacher_weights: str | None = None, own_images: bool = False,
             on_run: Callable[[Probe, int], None] | None = None) -> dict[str, Any]:
    """Run the search; write probes.csv, chosen.json and tune.md into ``out``; return chosen.json's content. A
    method that distills needs ``teacher_weights`` (e.g. the teacher ``bench fidelity`` trained)."""
    from kd_cluster.config import load_job

    if budget < 1:
        raise FidelityError("--budget is steps: >= 1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = str((out / "runs").resolve())
    train, val = split_url(dataset, train_split), split_url(dataset, eval_split)
    prefix = run_prefix(dataset, eval_split, train_split, student)
    if teacher_weights is None and load_job(space.job).method.name not in ("supervised", *NO_TEACHER):
        raise FidelityError(f"{space.job}: its method distills from a teacher: give --teacher-weights (e.g. "
                            "<bench fidelity --out>/runs/fmnist-teacher-3000/teacher/model.safetensors)")
    done: list[Probe] = []

    def run_all(probes: list[Probe]) -> None:
        for p in probes:
            p.cell = probe_cell(space, p, budget=budget, seed=seed, runs=runs, train=train, val=val, prefix=prefix,
                                student=student, teacher_weights=teacher_weights)
            spec = load_job(p.cell.job, p.cell.overrides)
            check_fresh(spec)
            if on_run:
                on_run(p, len(done))
            run_cell(p.cell, spec)
            if own_images:
                p.own_top1 = own_images_top1(p.cell, train)
            done.append(p)

    run_all(plan_rounds(space))
    if space.factors:
        run_all(combination_round(space, done))
    write_probes(done, out / "probes.csv")
    best = best_probe(done)
    chosen = {"space": str(space.path), "job": space.job, "budget": budget, "seed": seed, "train": train, "val": val,
              "student": student, "probes": len(done), "changes": best.changes, "overrides": _overrides(best.changes),
              STEPS: float(best.changes.get(STEPS, 1.0)), "val_top1": best.cell.top1, "run": best.cell.run,
              "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "chosen.json").write_text(json.dumps(chosen, indent=1))
    table = probes_table(read_probes(out / "probes.csv"))
    (out / "tune.md").write_text(
        f"{space.job} on {val}, trained on {train}{f' as {student}' if student else ''}, {budget} steps, seed {seed}; "
        f"{len(done)} probes ({space.path.name}{': ' + space.why if space.why else ''}). Chosen: {best.name} "
        f"(val top-1 {best.cell.top1:.4f}).\n\n{table}\n")
    return chosen


__all__ = ["Probe", "Space", "combination_round", "load_space", "plan_rounds", "probes_table", "read_probes",
           "run_tune", "write_probes"]
