"""`kd-cluster bench fidelity`: does distillation give a better student than training it alone?

One teacher is trained once (an ordinary run of ``jobs/fashion_mnist/teacher.yaml``; a later call finds its
stage finished and reuses the artifact). Then, for every seed and budget, the from-scratch student and each
method train the same student from the same initialisation on the same data order (the seed fixes both):
each is an ordinary run of ``jobs/fashion_mnist/<method>.yaml`` with the overrides recorded in ``runs.csv``,
so any cell can be re-run by itself with ``kd-cluster run``. Runs that already finished are skipped, so an
interrupted benchmark continues where it stopped.

The first budget applies to every method; further budgets (longer schedules) to the from-scratch student
and the function-matching family only (the paper's patience claim is about them).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("kd", "funmatch", "fixed_teacher", "independent_views", "fitnet", "at", "pad", "crd", "sskd", "ie_kd",
           "dml", "ie_dml")
"""Every distillation method the benchmark compares with the from-scratch student, in table order."""
SCRATCH = "scratch"
LONG_METHODS = (SCRATCH, "funmatch", "independent_views", "fixed_teacher")
"""Trained at every budget; the other methods at the first budget only."""
NO_TEACHER = ("dml", "ie_dml")
"""Methods that learn from peers trained alongside, not from the teacher."""
AUX_STAGES = {"sskd": "head", "ie_kd": "autoencoder"}
"""Methods whose job trains a module on the frozen teacher first; that stage gets a fifth of the budget."""

QUICK = {"seeds": [0], "budgets": [100], "teacher_steps": 300}
FULL = {"seeds": [0, 1, 2], "budgets": [500, 2000], "teacher_steps": 3000}


class FidelityError(ValueError):
    """A benchmark that cannot be set up as asked (bad option, missing job file)."""


@dataclass
class Cell:
    """One training run of the benchmark."""

    method: str
    seed: int
    budget: int
    run: str
    job: str
    overrides: list[str]
    top1: float = float("nan")
    wall_s: float = 0.0
    skipped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    """The run's final metrics: agreements with the teacher, the loss terms at the last logged step."""


@dataclass
class FidelityResult:
    teacher_top1: float
    teacher_steps: int
    cells: list[Cell] = field(default_factory=list)
    wall_s: float = 0.0
    table: str = ""


def split_url(dataset: str, split: str) -> str:
    """A split's manifest URL: of a builtin set (``fashion-mnist``) or of a folder/URL holding split folders."""
    from kd_cluster.data import builtin_names

    if dataset in builtin_names():
        return f"builtin://{dataset}/{split}"
    return f"{dataset.rstrip('/')}/{split}"


def run_prefix(dataset: str, eval_split: str, train_split: str = "train", student: str | None = None) -> str:
    """Run-name prefix: runs on another dataset, trained on another split, of another student or evaluated on
    another split are other runs, never reused here. The teacher's runs use the prefix of the first two only
    (it always trains on ``train``), so the limited-data regime reuses the full regime's teacher."""
    import re

    def safe(text: str) -> str:  # a run name holds letters, digits and _.- only
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)

    name = "fmnist" if dataset == "fashion-mnist" else safe(dataset.rstrip("/"))[-16:].strip("-.") or "data"
    name = name if eval_split == "test" else f"{name}-{eval_split}"
    if train_split != "train":
        name += f"-{safe(train_split)}"
    return f"{name}-{safe(student)}" if student else name


def student_overrides(method: str, student: str | None) -> list[str]:
    """Overrides that make ``student`` the trained student; DML's and IE-DML's peers become the same model (the
    job files' peers are the student's architecture, and stay so)."""
    if not student:
        return []
    over = [f"student.arch={student}"]
    if method == "dml":
        over.append(f"method.peers=[{student}]")
    elif method == "ie_dml":
        over.append(f"method.peer_arch={student}")
    return over


def plan_cells(jobs_dir: Path, methods: list[str], seeds: list[int], budgets: list[int], runs: str,
               teacher_weights: str, train: str, val: str, prefix: str, student: str | None = None) -> list[Cell]:
    """Every run of the benchmark with its job file and overrides, in running order."""
    cells = []
    for budget_no, budget in enumerate(budgets):
        for method in [SCRATCH, *methods]:
            if budget_no > 0 and method not in LONG_METHODS:
                continue
            job = jobs_dir / f"{method}.yaml"
            for seed in seeds:
                run = f"{prefix}-{method}-b{budget}-s{seed}"
                over = [f"name={run}", f"seed={seed}", f"schedule.steps={budget}",
                        f"schedule.warmup_steps={max(1, budget // 20)}", f"schedule.eval_every={budget}",
                        f"schedule.checkpoint_every={budget}", f"schedule.log_every={max(1, min(100, budget // 5))}",
                        f"storage.path={runs}", f"data.train={train}", f"data.val={val}",
                        "telemetry.wandb_mode=disabled", "telemetry.progress=false",
                        f"telemetry.wandb_dir={Path(runs).parent / 'telemetry' / 'wandb'}"]
                over += student_overrides(method, student)
                if method != SCRATCH and method not in NO_TEACHER:
                    over.append(f"teacher.weights={teacher_weights}")
                if method in AUX_STAGES:
                    aux, steps = AUX_STAGES[method], max(1, budget // 5)
                    over += [f"stages.{aux}.set.schedule.steps={steps}",
                             f"stages.{aux}.set.schedule.warmup_steps={max(0, steps // 20)}"]
                cells.append(Cell(method, seed, budget, run, str(job), over))
    return cells


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def stale_fields(spec: Any) -> list[str]:
    """The dotted fields in which an existing run folder's recorded spec (its ``job.json``) differs from ``spec``;
    empty when the run does not exist yet or was started with this very spec. A run folder is reused only when
    this is empty: a changed recipe must never be reported with the results of the old one."""
    from kd_cluster.cluster.driver import RESOLVED_SPEC, run_root
    from kd_cluster.storage import Store

    store = Store(run_root(spec), spec.storage.endpoint_url)
    if not store.exists(RESOLVED_SPEC):
        return []
    old, new = _flat(store.read_json(RESOLVED_SPEC).get("spec", {})), _flat(spec.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _check_fresh(spec: Any) -> None:
    diff = stale_fields(spec)
    if diff:
        from kd_cluster.cluster.driver import run_root

        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise FidelityError(f"{run_root(spec)}: this run was made with other settings ({shown} differ from its job "
                            "file and overrides now); reusing it would report the old recipe as the new one. Use "
                            "another --out, or move that run folder away")


def _top1(stage: dict[str, Any]) -> float:
    return float(stage.get("final_metrics", {}).get("eval/student_top1", float("nan")))


def summarize(cells: list[Cell]) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(method, budget) -> (mean, sample std (0 for one seed), seeds) of the final top-1."""
    by: dict[tuple[str, int], list[float]] = {}
    for c in cells:
        by.setdefault((c.method, c.budget), []).append(c.top1)
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in by.items()}


def markdown_table(cells: list[Cell], teacher_top1: float, teacher_steps: int) -> str:
    """Mean +- std per method and budget, the margin over the from-scratch student at that budget, and whether
    it exceeds twice the larger of the two standard deviations (needs >= 2 seeds)."""
    s = summarize(cells)
    rows = ["| method | steps | seeds | top-1 mean ± std | vs scratch | > 2σ | per seed |", "|---|---|---|---|---|---|---|"]
    per_seed: dict[tuple[str, int], list[str]] = {}
    for c in cells:
        per_seed.setdefault((c.method, c.budget), []).append(f"{c.top1:.4f}")
    budgets = sorted({c.budget for c in cells})
    order = [SCRATCH, *METHODS]
    for budget in budgets:
        base = s.get((SCRATCH, budget))
        for method in sorted({c.method for c in cells if c.budget == budget}, key=order.index):
            mean, std, n = s[(method, budget)]
            if method == SCRATCH or base is None:
                margin, sig = "-", "-"
            else:
                d = mean - base[0]
                margin = f"{d * 100:+.2f}"
                sig = "n/a" if n < 2 or base[2] < 2 else ("yes" if d > 2 * max(std, base[1]) else "no")
            label = "scratch (CE only)" if method == SCRATCH else method
            rows.append(f"| {label} | {budget} | {n} | {mean:.4f} ± {std:.4f} | {margin} | {sig} | "
                        f"{' '.join(per_seed[(method, budget)])} |")
    rows.append(f"| teacher (cnn_m) | {teacher_steps} | 1 | {teacher_top1:.4f} | - | - | - |")
    return "\n".join(rows)


def loss_terms(metrics: dict[str, float]) -> dict[str, float]:
    """The loss and its weighted terms at the last logged step (as the run report's loss panels pick them)."""
    from kd_cluster.results.report import is_loss_term

    return {k: v for k, v in metrics.items() if is_loss_term(k)}


def _fmt(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.6f}"


def write_csv(cells: list[Cell], path: Path) -> None:
    """Every run: its top-1, its agreement with the teacher on the eval split and on its last logged training
    batch (the function-matching paper's fit-vs-generalise gap), the loss terms at the end, and the command."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "budget", "top1", "val_agreement", "train_batch_agreement", "wall_s", "reused",
                    "run", "job", "loss_terms", "command"])
        for c in cells:
            cmd = " ".join(["kd-cluster", "run", c.job, "--no-ray", *c.overrides])
            terms = " ".join(f"{k}={v:.4g}" for k, v in sorted(loss_terms(c.metrics).items()))
            w.writerow([c.method, c.seed, c.budget, f"{c.top1:.6f}", _fmt(c.metrics.get("eval/agreement")),
                        _fmt(c.metrics.get("train/teacher_agreement")), f"{c.wall_s:.1f}", int(c.skipped), c.run,
                        c.job, terms, cmd])


def _mean_std(values: list[float]) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "-"
    return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"


def agreement_table(cells: list[Cell]) -> str:
    """The function-matching family at every budget: top-1 next to the student's agreement with the teacher on
    its last training batch and on the eval split (a student that fits its targets but not the eval split has
    a high first and a low second)."""
    rows = ["| method | steps | top-1 | agreement, last train batch | agreement, eval split |", "|---|---|---|---|---|"]
    order = [SCRATCH, *METHODS]
    keys = sorted({(c.method, c.budget) for c in cells if c.method in LONG_METHODS and c.method != SCRATCH},
                  key=lambda k: (order.index(k[0]), k[1]))
    for method, budget in keys:
        cs = [c for c in cells if (c.method, c.budget) == (method, budget)]
        rows.append(f"| {method} | {budget} | {_mean_std([c.top1 for c in cs])} | "
                    f"{_mean_std([c.metrics.get('train/teacher_agreement', math.nan) for c in cs])} | "
                    f"{_mean_std([c.metrics.get('eval/agreement', math.nan) for c in cs])} |")
    return "\n".join(rows)


def plot(cells: list[Cell], teacher_top1: float, path: Path, regime: str = "") -> None:
    """Top-1 against the budget, one line per method, error bars of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(cells)
    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=110)
    order = [SCRATCH, *METHODS]
    # 12 methods: the default cycle of 10 colours would give two pairs one colour; tab20's dark shades, then its light
    tab20 = plt.get_cmap("tab20").colors
    palette = [tab20[j] for j in (*range(0, 20, 2), *range(1, 20, 2))]
    for i, method in enumerate(sorted({c.method for c in cells}, key=order.index)):
        pts = sorted((b, *s[(m, b)][:2]) for (m, b) in s if m == method)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="scratch" if method == SCRATCH else method,
                    linewidth=2.5 if method == SCRATCH else 1.2,
                    color="black" if method == SCRATCH else palette[(i - 1) % len(palette)])
    if not math.isnan(teacher_top1):
        ax.axhline(teacher_top1, linestyle="--", color="grey", label="teacher")
    budgets = sorted({c.budget for c in cells})
    if len(budgets) > 1:
        ax.set_xscale("log")
        ax.minorticks_off()  # only the budgets are labelled (a log axis would add e.g. 6x10^2 between 500 and 2000)
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("student training steps")
    ax.set_ylabel("top-1 (mean ± std over seeds)")
    ax.set_title(f"Distilled vs from-scratch student{f' ({regime})' if regime else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a line
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_fidelity(*, jobs_dir: Path, out: Path, methods: list[str], seeds: list[int], budgets: list[int],
                 teacher_steps: int, dataset: str = "fashion-mnist", eval_split: str = "test",
                 train_split: str = "train", student: str | None = None,
                 prefix: str | None = None, on_run: Callable[[Cell, int, int], None] | None = None) -> FidelityResult:
    """Train the teacher (once, on ``train``), then every cell (students on ``train_split``, as ``student`` when
    given, else the job files' student); write table.md, runs.csv and fidelity.png into ``out``."""
    from kd_cluster.cluster.driver import run_job
    from kd_cluster.config import load_job
    from kd_cluster.results import attempt

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FidelityError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if not seeds or not budgets or min(budgets) < 1:
        raise FidelityError("--seeds and --budgets need at least one value each; budgets are steps >= 1")
    for name in ("teacher", SCRATCH, *methods):
        if not (jobs_dir / f"{name}.yaml").is_file():
            raise FidelityError(f"{jobs_dir / (name + '.yaml')}: missing job file")
    os.environ.setdefault("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = str((out / "runs").resolve())
    if student:
        from kd_cluster.models import ModelError, check_model_name

        try:
            check_model_name(student)
        except ModelError as exc:
            raise FidelityError(f"--student: {exc}") from None
    teacher_train, train, val = (split_url(dataset, s) for s in ("train", train_split, eval_split))
    teacher_prefix = run_prefix(dataset, eval_split)
    prefix = prefix or run_prefix(dataset, eval_split, train_split, student)
    tel = f"telemetry.wandb_dir={out.resolve() / 'telemetry' / 'wandb'}"
    teacher_over = [f"name={teacher_prefix}-teacher-{teacher_steps}", f"schedule.steps={teacher_steps}",
                    f"schedule.warmup_steps={max(1, teacher_steps // 20)}", f"schedule.eval_every={teacher_steps}",
                    f"schedule.checkpoint_every={teacher_steps}", f"schedule.log_every={max(1, min(100, teacher_steps // 5))}",
                    f"storage.path={runs}", f"data.train={teacher_train}", f"data.val={val}", "telemetry.wandb_mode=disabled",
                    "telemetry.progress=false", tel]
    tspec = load_job(jobs_dir / "teacher.yaml", teacher_over)
    teacher_stage = tspec.stages[-1].name if tspec.stages else "main"  # the stage whose artifact students load
    teacher_weights = f"{runs}/{tspec.name}/{teacher_stage}/model.safetensors"
    cells = plan_cells(jobs_dir, methods, seeds, budgets, runs, teacher_weights, train, val, prefix, student)
    specs = [load_job(c.job, c.overrides) for c in cells]
    for spec in (tspec, *specs):  # before anything trains: a stale run stops the benchmark at once
        _check_fresh(spec)
    with attempt(tspec):
        tres = run_job(tspec, str(jobs_dir / "teacher.yaml"), use_ray=False)
    teacher_top1 = _top1(tres.stages[teacher_stage])
    for i, (cell, spec) in enumerate(zip(cells, specs)):
        if on_run:
            on_run(cell, i, len(cells))
        t1 = time.perf_counter()
        with attempt(spec):
            res = run_job(spec, cell.job, use_ray=False)
        last = list(res.stages)[-1]
        cell.top1 = _top1(res.stages[last])
        cell.metrics = {k: float(v) for k, v in res.stages[last].get("final_metrics", {}).items()
                        if isinstance(v, (int, float))}
        cell.skipped = last in res.skipped
        cell.wall_s = float(res.stages[last].get("wall_s", time.perf_counter() - t1)) if cell.skipped else \
            time.perf_counter() - t1
    result = FidelityResult(teacher_top1, teacher_steps, cells, time.perf_counter() - t0)
    result.table = markdown_table(cells, teacher_top1, teacher_steps)
    t_wall = float(tres.stages[teacher_stage].get("wall_s", float("nan")))
    header = (f"Student top-1 on {val} ({len(seeds)} seed(s): {', '.join(map(str, seeds))}), students trained on "
              f"{train}{f' as {student}' if student else ''}; teacher (on {teacher_train}) "
              f"{teacher_steps} steps ({t_wall:.0f} s when it was trained{', reused here' if teacher_stage in tres.skipped else ''}); "
              f"wall time of this call {result.wall_s:.0f} s on {os.cpu_count()} CPUs.\n\n")
    family = agreement_table(cells)
    (out / "table.md").write_text(header + result.table + "\n" + (
        "\n\nThe function-matching family (mean ± std over seeds):\n\n" + family + "\n" if family.count("\n") > 1 else ""))
    write_csv(cells, out / "runs.csv")
    regime = ", ".join(x for x in (f"students on {train_split}" if train_split != "train" else "", student or "") if x)
    plot(cells, teacher_top1, out / "fidelity.png", regime)
    return result


__all__ = ["FULL", "LONG_METHODS", "METHODS", "QUICK", "Cell", "FidelityError", "FidelityResult", "agreement_table",
           "loss_terms", "markdown_table", "plan_cells", "run_fidelity", "run_prefix", "split_url", "stale_fields",
           "student_overrides", "summarize"]
