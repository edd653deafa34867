"""`kd-cluster bench fidelity`: does distillation give a better student than training it alone?

One teacher is trained once (an ordinary run of ``jobs/fashion_mnist/teacher.yaml``; a later call finds its
stage finished and reuses the artifact). Then, for every seed and budget, the from-scratch student and each
method train the same student from the same initialisation on the same data order (the seed fixes both):
each is an ordinary run of ``jobs/fashion_mnist/<method>.yaml`` with the overrides recorded in ``runs.csv``,
so any cell can be re-run by itself with ``kd-cluster run``. Runs that already finished are skipped, so an
interrupted benchmark continues where it stopped.

The first budget applies to every method; further budgets (longer schedules) to the from-scratch student
and the function-matching family only (the paper's patience claim is about them), or to every method with
``all_budgets``.

The baseline a method must beat is the *tuned* from-scratch student when one is given (``tuned``: the overrides
``kd-cluster bench tune`` chose on the val split), shown beside the untuned one. A method **wins** when its
mean exceeds the baseline's by more than twice the larger standard deviation *and* Welch's t-test (one-sided:
the method is better) gives p < 0.05 after Holm's correction across the methods of the table
(:func:`compare`). Variants (``variants``: e.g. the same cells with Shampoo instead of AdamW) run at the longest
budget and are compared with the same variant of the baseline.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("kd", "kd_ls", "dkd", "dist", "funmatch", "fixed_teacher", "independent_views", "fitnet", "at", "pad", "crd",
           "sskd", "ie_kd", "dml", "ie_dml")
"""Every distillation method the benchmark compares with the from-scratch student, in table order."""
SCRATCH = "scratch"
TUNED = "scratch_tuned"
"""The from-scratch student with the settings ``bench tune`` chose (scratch.yaml plus those overrides)."""
BASELINES = (SCRATCH, TUNED)
LONG_METHODS = (SCRATCH, "funmatch", "independent_views", "fixed_teacher")
"""Trained at every budget (and the tuned scratch, the baseline, with them); the other methods at the first budget
only (unless ``all_budgets``)."""
NO_TEACHER = ("dml", "ie_dml")
"""Methods that learn from peers trained alongside, not from the teacher."""
AUX_STAGES = {"sskd": "head", "ie_kd": "autoencoder"}
"""Methods whose job trains a module on the frozen teacher first; that stage gets a fifth of the budget."""
VARIANTS = {"shampoo": ["optimizer.name=shampoo", "optimizer.shampoo.block_size=128", "optimizer.shampoo.update_every=20",
                        "optimizer.shampoo.start_step=20", "optimizer.shampoo.graft=rmsprop"]}
"""Optimizer variants of a cell (the job's AdamW replaced), with the settings of ``shampoo_vs_adamw.py``."""
SIGNIFICANCE = 0.05

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
    variant: str = ""
    """'' (the job's optimizer) or a key of :data:`VARIANTS`."""
    steps: int = 0
    """Steps the run trained (the budget, unless the tuned baseline chose another schedule); 0: the budget."""
    own_top1: float = float("nan")
    """Top-1 of the final student on the images it trained on (clean centre crops), when measured."""
    source: str = ""
    """The results file this cell's row was taken from (``--prior-runs``); '' when its run is here."""

    @property
    def key(self) -> tuple[str, int, str]:
        return self.method, self.budget, self.variant


@dataclass
class FidelityResult:
    teacher_top1: float
    teacher_steps: int
    cells: list[Cell] = field(default_factory=list)
    wall_s: float = 0.0
    table: str = ""
    preempted: dict[str, Any] | None = None


def split_url(dataset: str, split: str) -> str:
    """A split's manifest URL: of a builtin set (``fashion-mnist``) or of a folder/URL holding split folders."""
    from kd_cluster.data import builtin_names

    if dataset in builtin_names():
        return f"builtin://{dataset}/{split}"
    return f"{dataset.rstrip('/')}/{split}"


def safe_name(text: str) -> str:
    """``text`` as part of a run name (letters, digits and _.- only)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def run_prefix(dataset: str, eval_split: str, train_split: str = "train", student: str | None = None) -> str:
    """Run-name prefix: runs on another dataset, trained on another split, of another student or evaluated on
    another split are other runs, never reused here. The teacher's runs use the prefix of the first two only
    (it always trains on ``train``), so the limited-data regime reuses the full regime's teacher."""
    name = "fmnist" if dataset == "fashion-mnist" else safe_name(dataset.rstrip("/"))[-16:].strip("-.") or "data"
    name = name if eval_split == "test" else f"{name}-{eval_split}"
    if train_split != "train":
        name += f"-{safe_name(train_split)}"
    return f"{name}-{safe_name(student)}" if student else name


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


def shown_path(path: str | Path) -> str:
    """A job file's path as runs.csv records it: relative to this directory when inside it (commands that read
    the same wherever the repository is), else as it is."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def schedule_overrides(steps: int) -> list[str]:
    """The schedule of a run of ``steps`` steps: 5% warm-up, one evaluation and one checkpoint at the end."""
    return [f"schedule.steps={steps}", f"schedule.warmup_steps={max(1, steps // 20)}", f"schedule.eval_every={steps}",
            f"schedule.checkpoint_every={steps}", f"schedule.log_every={max(1, min(100, steps // 5))}"]


def run_overrides(run: str, seed: int, steps: int, runs: str, train: str, val: str) -> list[str]:
    """What every run of the benchmark sets: its name, seed, schedule, storage, data splits and quiet telemetry."""
    return [f"name={run}", f"seed={seed}", *schedule_overrides(steps), f"storage.path={runs}", f"data.train={train}",
            f"data.val={val}", "telemetry.wandb_mode=disabled", "telemetry.progress=false",
            f"telemetry.wandb_dir={Path(runs).parent / 'telemetry' / 'wandb'}"]


@dataclass(frozen=True)
class Tuned:
    """The from-scratch student's settings as ``bench tune`` chose them: overrides of scratch.yaml and the steps
    as a multiple of the budget."""

    overrides: tuple[str, ...] = ()
    steps_factor: float = 1.0

    @property
    def tag(self) -> str:
        """A short digest: runs of other tuned settings get other names."""
        text = "\n".join([*sorted(self.overrides), f"steps x{self.steps_factor:g}"])
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def describe(self) -> str:
        parts = [o for o in self.overrides] + ([f"steps x{self.steps_factor:g}"] if self.steps_factor != 1 else [])
        return ", ".join(parts) or "the job's own settings"


def plan_cells(jobs_dir: Path, methods: list[str], seeds: list[int], budgets: list[int], runs: str,
               teacher_weights: str, train: str, val: str, prefix: str, student: str | None = None, *,
               all_budgets: bool = False, tuned: Tuned | None = None, variants: Sequence[str] = (),
               variant_methods: Sequence[str] = (TUNED, "funmatch")) -> list[Cell]:
    """Every run of the benchmark with its job file and overrides, in running order: per budget the untuned and
    tuned from-scratch students then the methods; then, at the longest budget, each variant of
    ``variant_methods`` (the untuned scratch when there is no tuned one)."""
    cells = []
    groups = [(b, "") for b in budgets] + [(max(budgets), v) for v in variants]
    if not tuned:
        variant_methods = [SCRATCH if m == TUNED else m for m in variant_methods]
    for budget_no, (budget, variant) in enumerate(groups):
        row = [SCRATCH, *([TUNED] if tuned else []), *methods]
        for method in row:
            if variant and method not in variant_methods:
                continue
            if not variant and budget_no > 0 and not all_budgets and method not in (*LONG_METHODS, TUNED):
                continue
            job = jobs_dir / f"{SCRATCH if method == TUNED else method}.yaml"
            for seed in seeds:
                name = f"{method}-{tuned.tag}" if method == TUNED and tuned else method
                run = f"{prefix}-{name}{f'-{variant}' if variant else ''}-b{budget}-s{seed}"
                steps = max(1, round(budget * tuned.steps_factor)) if method == TUNED and tuned else budget
                over = run_overrides(run, seed, steps, runs, train, val)
                over += student_overrides(method, student)
                if method == TUNED and tuned:
                    over += list(tuned.overrides)
                if method not in BASELINES and method not in NO_TEACHER:
                    over.append(f"teacher.weights={teacher_weights}")
                if method in AUX_STAGES:
                    aux, aux_steps = AUX_STAGES[method], max(1, budget // 5)
                    over += [f"stages.{aux}.set.schedule.steps={aux_steps}",
                             f"stages.{aux}.set.schedule.warmup_steps={max(0, aux_steps // 20)}"]
                over += VARIANTS[variant] if variant else []
                cells.append(Cell(method, seed, budget, run, shown_path(job), over, variant=variant, steps=steps))
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


def check_fresh(spec: Any) -> None:
    """Refuse to reuse a run folder made with other settings (:func:`stale_fields`)."""
    diff = stale_fields(spec)
    if diff:
        from kd_cluster.cluster.driver import run_root

        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise FidelityError(f"{run_root(spec)}: this run was made with other settings ({shown} differ from its job "
                            "file and overrides now); reusing it would report the old recipe as the new one. Use "
                            "another --out, or move that run folder away")


def _top1(stage: dict[str, Any]) -> float:
    return float(stage.get("final_metrics", {}).get("eval/student_top1", float("nan")))


def run_exists(spec: Any) -> bool:
    """Whether the run folder of ``spec`` exists (has its ``job.json``)."""
    from kd_cluster.cluster.driver import RESOLVED_SPEC, run_root
    from kd_cluster.storage import Store

    return Store(run_root(spec), spec.storage.endpoint_url).exists(RESOLVED_SPEC)


def _prior_note(cells: list[Cell], prior: dict[str, Cell]) -> str:
    """What the header says of rows taken from earlier results files, and of the check that the runs trained here
    (the from-scratch students always; any other run found here) give those files' numbers for the same runs."""
    if not prior:
        return ""
    taken = [c for c in cells if c.source]
    files = sorted({c.source for c in taken})
    same = [(c, prior[c.run]) for c in cells if not c.source and c.run in prior
            and _what_it_trained(prior[c.run]) == _what_it_trained(c)]
    diffs = [abs(c.top1 - p.top1) for c, p in same]
    check = (f" Runs here that those files also have: {sum(d < 5e-5 for d in diffs)} of {len(diffs)} give the same "
             f"top-1 to 4 digits, the largest difference {max(diffs) * 100:.2f} points." if diffs else "")
    return (f" {len(taken)} rows are taken from earlier results files ({', '.join(files) or 'none'}): the same runs, "
            f"not retrained here (column source of runs.csv).{check}")


def run_cell(cell: Cell, spec: Any) -> None:
    """Train one cell (or find it finished) and record its top-1, final metrics and wall time on it."""
    from kd_cluster.cluster.driver import run_job
    from kd_cluster.results import attempt

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


PATH_SETTINGS = ("storage.path=", "telemetry.wandb_dir=", "teacher.weights=")
"""Overrides that say where a run lived, not what it trained: ignored when a cell is matched to an earlier row."""


def _what_it_trained(cell: Cell) -> tuple[Any, ...]:
    return (cell.method, cell.seed, cell.budget, cell.variant, Path(cell.job).parts[-2:],
            tuple(o for o in cell.overrides if not o.startswith(PATH_SETTINGS)))


def take_prior(cell: Cell, prior: dict[str, Cell]) -> bool:
    """Fill ``cell`` from an earlier results row of the same run (same name, job file, seed, budget and overrides but
    for where it was stored), when there is one; True when it did."""
    old = prior.get(cell.run)
    if old is None or _what_it_trained(old) != _what_it_trained(cell):
        return False
    cell.top1, cell.metrics, cell.wall_s, cell.skipped, cell.own_top1 = (old.top1, old.metrics, old.wall_s, True,
                                                                          old.own_top1)
    cell.source = old.source
    return True


def own_images_top1(cell: Cell, train: str) -> float:
    """The cell's final student on the split it trained on, clean centre crops: how tightly it fits its own images
    (next to its eval top-1: does it overfit, or underfit?). Kept in the run folder (``own_images.json``)."""
    from kd_cluster.results.evaluate import evaluate
    from kd_cluster.results.target import from_run

    runs = next(o.split("=", 1)[1] for o in cell.overrides if o.startswith("storage.path="))
    cache = Path(runs) / cell.run / "own_images.json"
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("data") == train:
            return float(doc["top1"])
    res = evaluate(from_run(cell.run, runs, None, None), train, str(cache), loader_workers=0)
    return float(res["top1"])


def summarize(cells: list[Cell]) -> dict[tuple[str, int, str], tuple[float, float, int]]:
    """(method, budget, variant) -> (mean, sample std (0 for one seed), seeds) of the final top-1."""
    by: dict[tuple[str, int, str], list[float]] = {}
    for c in cells:
        by.setdefault(c.key, []).append(c.top1)
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in by.items()}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (NaN ones are left out of the family)."""
    known = sorted((p, k) for k, p in pvalues.items() if not math.isnan(p))
    out = {k: math.nan for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(known):
        running = max(running, min(1.0, (len(known) - i) * p))
        out[k] = running
    return out


@dataclass(frozen=True)
class Comparison:
    """One method against the baseline of its table."""

    margin: float
    """Mean top-1 minus the baseline's."""
    two_sigma: bool | None
    """The margin exceeds twice the larger standard deviation (None: fewer than 2 seeds on a side)."""
    p: float
    """Welch's t-test, one-sided (the method is better), NaN with fewer than 2 seeds on a side."""
    p_holm: float
    """``p`` adjusted by Holm's method across the methods of the table."""

    @property
    def wins(self) -> bool:
        return bool(self.two_sigma) and self.p_holm < SIGNIFICANCE


def baseline_of(cells: list[Cell], budget: int, variant: str) -> str | None:
    """The baseline of a table: the tuned from-scratch student when the table has one, else the untuned one."""
    present = {c.method for c in cells if c.budget == budget and c.variant == variant}
    return TUNED if TUNED in present else (SCRATCH if SCRATCH in present else None)


def compare(cells: list[Cell]) -> dict[tuple[str, int, str], Comparison]:
    """Every method of every table (a budget and a variant) against that table's baseline."""
    import warnings

    from scipy.stats import ttest_ind

    values: dict[tuple[str, int, str], list[float]] = {}
    for c in cells:
        values.setdefault(c.key, []).append(c.top1)
    out: dict[tuple[str, int, str], Comparison] = {}
    for budget, variant in sorted({(c.budget, c.variant) for c in cells}):
        base = baseline_of(cells, budget, variant)
        if base is None:
            continue
        b = values[(base, budget, variant)]
        rows = {m: v for (m, bb, vv), v in values.items() if (bb, vv) == (budget, variant) and m != base}
        raw: dict[str, tuple[float, bool | None, float]] = {}
        for m, v in rows.items():
            d = statistics.fmean(v) - statistics.fmean(b)
            if len(v) < 2 or len(b) < 2:
                raw[m] = (d, None, math.nan)
                continue
            spread = max(statistics.stdev(v), statistics.stdev(b))
            with warnings.catch_warnings():  # near-equal seeds: scipy warns of precision, the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(ttest_ind(v, b, equal_var=False, alternative="greater").pvalue) if spread > 0 else \
                    (0.0 if d > 0 else 1.0)
            raw[m] = (d, d > 2 * spread, p)
        family = {m: r[2] for m, r in raw.items() if m not in BASELINES}  # the methods, not the other baseline
        adjusted = holm(family)
        for m, (d, sig, p) in raw.items():
            out[(m, budget, variant)] = Comparison(d, sig, p, adjusted.get(m, math.nan))
    return out


def label(method: str, variant: str = "") -> str:
    """A row's name in the tables and the plot."""
    name = {SCRATCH: "scratch (untuned, CE only)", TUNED: "scratch (tuned)"}.get(method, method)
    return f"{name} + {variant}" if variant else name


def _order(key: tuple[str, int, str]) -> tuple[Any, ...]:
    method, budget, variant = key
    order = [SCRATCH, TUNED, *METHODS]
    return (variant != "", budget, variant, order.index(method) if method in order else len(order), method)


def _fmt_p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def markdown_table(cells: list[Cell], teacher_top1: float, teacher_steps: int) -> str:
    """Mean ± std per method, budget and variant; the margin over the table's baseline (the tuned from-scratch
    student when there is one); whether it exceeds twice the larger standard deviation; Welch's one-sided
    p-value, Holm-adjusted across the table's methods; and whether the method wins (both hold)."""
    s, cmp = summarize(cells), compare(cells)
    tuned = any(c.method == TUNED for c in cells)
    rows = [f"| method | steps | seeds | top-1 mean ± std | vs {'tuned ' if tuned else ''}scratch | > 2σ | p (Holm) | "
            "wins | per seed |", "|---|---|---|---|---|---|---|---|---|"]
    per_seed: dict[tuple[str, int, str], list[str]] = {}
    steps: dict[tuple[str, int, str], int] = {}
    for c in cells:
        per_seed.setdefault(c.key, []).append(f"{c.top1:.4f}")
        steps[c.key] = c.steps or c.budget
    for key in sorted(s, key=_order):
        mean, std, n = s[key]
        c = cmp.get(key)
        if c is None:
            margin = sig = p = wins = "-"
        else:
            margin = f"{c.margin * 100:+.2f}"
            sig = "n/a" if c.two_sigma is None else ("yes" if c.two_sigma else "no")
            p = "-" if key[0] in BASELINES else _fmt_p(c.p_holm)
            wins = "-" if key[0] in BASELINES else ("**yes**" if c.wins else "no")
        rows.append(f"| {label(key[0], key[2])} | {steps[key]} | {n} | {mean:.4f} ± {std:.4f} | {margin} | {sig} | {p} | "
                    f"{wins} | {' '.join(per_seed[key])} |")
    if not math.isnan(teacher_top1):
        rows.append(f"| teacher | {teacher_steps} | 1 | {teacher_top1:.4f} | - | - | - | - | - |")
    return "\n".join(rows)


def win_counts(cells: list[Cell]) -> dict[tuple[int, str], tuple[int, int]]:
    """(budget, variant) -> (methods that win, methods compared)."""
    out: dict[tuple[int, str], list[int]] = {}
    for (m, budget, variant), c in compare(cells).items():
        if m not in BASELINES:
            n = out.setdefault((budget, variant), [0, 0])
            n[0] += c.wins
            n[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def loss_terms(metrics: dict[str, float]) -> dict[str, float]:
    """The loss and its weighted terms at the last logged step (as the run report's loss panels pick them)."""
    from kd_cluster.results.report import is_loss_term

    return {k: v for k, v in metrics.items() if is_loss_term(k)}


def _fmt(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.6f}"


CSV_COLUMNS = ["method", "seed", "budget", "top1", "val_agreement", "train_batch_agreement", "wall_s", "reused", "run",
               "job", "loss_terms", "command", "variant", "steps", "own_images_top1", "source"]
"""runs.csv; the teacher is the row whose method is ``teacher`` (budget: its steps)."""


def write_csv(cells: list[Cell], path: Path, teacher: Cell | None = None) -> None:
    """Every run: its top-1, its agreement with the teacher on the eval split and on its last logged training
    batch (the function-matching paper's fit-vs-generalise gap), the loss terms at the end, and the command;
    the teacher's run first."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for c in ([teacher] if teacher else []) + cells:
            cmd = " ".join(["kd-cluster", "run", c.job, "--no-ray", *c.overrides])
            terms = " ".join(f"{k}={v:.4g}" for k, v in sorted(loss_terms(c.metrics).items()))
            w.writerow([c.method, c.seed, c.budget, f"{c.top1:.6f}", _fmt(c.metrics.get("eval/agreement")),
                        _fmt(c.metrics.get("train/teacher_agreement")), f"{c.wall_s:.1f}", int(c.skipped), c.run,
                        c.job, terms, cmd, c.variant, c.steps or c.budget, _fmt(c.own_top1), c.source])


def read_csv(*paths: Path) -> tuple[list[Cell], float, int]:
    """The cells of one or more ``runs.csv`` files (older files without the variant and steps columns too), and the
    teacher's top-1 and steps (NaN and 0 when no file has a teacher row)."""
    cells, teacher_top1, teacher_steps = [], math.nan, 0
    for path in paths:
        with Path(path).open(newline="") as f:
            for r in csv.DictReader(f):
                metrics_src = r.get("loss_terms") or ""
                metrics = {k: float(r[col]) for k, col in (("eval/agreement", "val_agreement"),
                                                           ("train/teacher_agreement", "train_batch_agreement"))
                           if r.get(col)}
                cell = Cell(r["method"], int(r["seed"]), int(r["budget"]), r["run"], r["job"],
                            r["command"].split()[4:], float(r["top1"]), float(r["wall_s"]), r["reused"] == "1",
                            metrics, r.get("variant") or "", int(r.get("steps") or r["budget"]),
                            float(r.get("own_images_top1") or "nan"), r.get("source") or shown_path(path))
                cell.metrics.update({k: float(v) for k, v in (t.split("=", 1) for t in metrics_src.split()) if v})
                if cell.method == "teacher":
                    teacher_top1, teacher_steps = cell.top1, cell.budget
                else:
                    cells.append(cell)
    return cells, teacher_top1, teacher_steps


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
    keys = sorted({c.key for c in cells if c.method in LONG_METHODS and c.method != SCRATCH}, key=_order)
    for key in keys:
        cs = [c for c in cells if c.key == key]
        rows.append(f"| {label(key[0], key[2])} | {key[1]} | {_mean_std([c.top1 for c in cs])} | "
                    f"{_mean_std([c.metrics.get('train/teacher_agreement', math.nan) for c in cs])} | "
                    f"{_mean_std([c.metrics.get('eval/agreement', math.nan) for c in cs])} |")
    return "\n".join(rows)


def fit_table(cells: list[Cell]) -> str:
    """Per method and budget: top-1 on the images the students trained on next to top-1 on the eval split, and
    the gap (a student far better on its own images overfits them; one no better on them underfits)."""
    rows = ["| method | steps | own images top-1 | eval top-1 | gap |", "|---|---|---|---|---|"]
    for key in sorted({c.key for c in cells if not math.isnan(c.own_top1)}, key=_order):
        cs = [c for c in cells if c.key == key]
        gap = statistics.fmean(c.own_top1 - c.top1 for c in cs)
        rows.append(f"| {label(key[0], key[2])} | {cs[0].steps or key[1]} | {_mean_std([c.own_top1 for c in cs])} | "
                    f"{_mean_std([c.top1 for c in cs])} | {gap * 100:+.2f} |")
    return "\n".join(rows)


def plot(cells: list[Cell], teacher_top1: float, path: Path, regime: str = "", xlabel: str = "student training steps",
         x_of: Callable[[int], float] = float) -> None:
    """Top-1 against the budget, one line per method (and variant: a single point at its budget), error bars of one
    standard deviation; ``x_of`` maps a budget to the x axis (e.g. epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(cells)
    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=110)
    # 12 methods: the default cycle of 10 colours would give two pairs one colour; tab20's dark shades, then its light
    tab20 = plt.get_cmap("tab20").colors
    palette = [tab20[j] for j in (*range(0, 20, 2), *range(1, 20, 2))]
    lines = sorted({(m, v) for (m, _, v) in s}, key=lambda mv: _order((mv[0], 0, mv[1])))
    for i, (method, variant) in enumerate(lines):
        pts = sorted((x_of(b), *s[(m, b, v)][:2]) for (m, b, v) in s if (m, v) == (method, variant))
        xs, ys, es = zip(*pts)
        base = method in BASELINES
        color = ("black" if method == TUNED else "grey") if base else palette[i % len(palette)]
        ax.errorbar(xs, ys, yerr=es, marker="s" if variant else "o", capsize=3, label=label(method, variant),
                    linewidth=2.5 if method == TUNED else 1.2, color=color, linestyle=":" if variant else "-")
    if not math.isnan(teacher_top1):
        ax.axhline(teacher_top1, linestyle="--", color="grey", label="teacher")
    budgets = sorted({c.budget for c in cells})
    ticks = [x_of(b) for b in budgets]
    if len(budgets) > 1:
        ax.set_xscale("log")
        ax.minorticks_off()  # only the budgets are labelled (a log axis would add e.g. 6x10^2 between 500 and 2000)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (mean ± std over seeds)")
    ax.set_title(f"Distilled vs from-scratch student{f' ({regime})' if regime else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a line
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_tables(out: Path, cells: list[Cell], teacher_top1: float, teacher_steps: int, header: str) -> str:
    """table.md: the header, the main table, the win counts, and the function-matching family's agreements."""
    table = markdown_table(cells, teacher_top1, teacher_steps)
    counts = win_counts(cells)
    wins = "; ".join(f"{b} steps{f' ({v})' if v else ''}: {w} of {n}" for (b, v), (w, n) in sorted(counts.items()))
    family = agreement_table(cells)
    (out / "table.md").write_text(
        header + table + "\n" + (f"\nMethods that win (> 2σ and Holm-adjusted p < {SIGNIFICANCE}): {wins}.\n" if wins
                                 else "") +
        ("\n\nThe function-matching family (mean ± std over seeds):\n\n" + family + "\n" if family.count("\n") > 1
         else ""))
    return table


def load_tuned(path: str | Path) -> Tuned:
    """The settings a ``bench tune`` call chose (its ``chosen.json``)."""
    try:
        doc = json.loads(Path(path).read_text())
        return Tuned(tuple(doc["overrides"]), float(doc.get("steps_factor", 1.0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FidelityError(f"--tuned {path}: not a `kd-cluster bench tune` chosen.json ({exc})") from None


def run_fidelity(*, jobs_dir: Path, out: Path, methods: list[str], seeds: list[int], budgets: list[int],
                 teacher_steps: int, dataset: str = "fashion-mnist", eval_split: str = "test",
                 train_split: str = "train", student: str | None = None, prefix: str | None = None,
                 all_budgets: bool = False, tuned: Tuned | None = None, variants: Sequence[str] = (),
                 preempt: int = 0, runs_dir: Path | None = None, own_images: bool = False,
                 prior_runs: Sequence[Path] = (),
                 on_run: Callable[[Cell, int, int], None] | None = None) -> FidelityResult:
    """Train the teacher (once, on ``train``), then every cell (students on ``train_split``, as ``student`` when
    given, else the job files' student); with ``own_images``, also each student's top-1 on its training split;
    write table.md, runs.csv and fidelity.png into ``out`` (the runs go to
    ``runs_dir``, by default ``out/runs``: benchmarks that share one reuse each other's runs). ``prior_runs``:
    earlier ``runs.csv`` files whose rows stand in for the methods' runs not found here (the same run, job file,
    seed, budget and overrides); the from-scratch students always train here, and the header says how the runs
    found or trained here compare with those files' (the check that this machine reproduces them). With ``preempt``,
    the longest function-matching run of the first seed is then trained again under SIGKILLs (:func:`preempted`)."""
    from kd_cluster.cluster.driver import run_job
    from kd_cluster.config import load_job
    from kd_cluster.data import load_manifest
    from kd_cluster.results import attempt

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FidelityError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if not seeds or not budgets or min(budgets) < 1:
        raise FidelityError("--seeds and --budgets need at least one value each; budgets are steps >= 1")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise FidelityError(f"--variants: unknown {bad}; known: {', '.join(VARIANTS)}")
    if preempt and "funmatch" not in methods:
        raise FidelityError("--preempt kills the longest funmatch run: include funmatch in --methods")
    for name in ("teacher", SCRATCH, *methods):
        if not (jobs_dir / f"{name}.yaml").is_file():
            raise FidelityError(f"{jobs_dir / (name + '.yaml')}: missing job file")
    os.environ.setdefault("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = str((runs_dir or out / "runs").resolve())
    if student:
        from kd_cluster.models import ModelError, check_model_name

        try:
            check_model_name(student)
        except ModelError as exc:
            raise FidelityError(f"--student: {exc}") from None
    teacher_train, train, val = (split_url(dataset, s) for s in ("train", train_split, eval_split))
    teacher_prefix = run_prefix(dataset, eval_split)
    prefix = prefix or run_prefix(dataset, eval_split, train_split, student)
    teacher_run = f"{teacher_prefix}-teacher-{teacher_steps}"
    teacher_over = [o for o in run_overrides(teacher_run, 0, teacher_steps, runs, teacher_train, val)
                    if not o.startswith("seed=")]  # the teacher job's own seed
    tspec = load_job(jobs_dir / "teacher.yaml", teacher_over)
    teacher_stage = tspec.stages[-1].name if tspec.stages else "main"  # the stage whose artifact students load
    teacher_weights = f"{runs}/{tspec.name}/{teacher_stage}/model.safetensors"
    cells = plan_cells(jobs_dir, methods, seeds, budgets, runs, teacher_weights, train, val, prefix, student,
                       all_budgets=all_budgets, tuned=tuned, variants=variants)
    specs = [load_job(c.job, c.overrides) for c in cells]
    for spec in (tspec, *specs):  # before anything trains: a stale run stops the benchmark at once
        check_fresh(spec)
    with attempt(tspec):
        tres = run_job(tspec, str(jobs_dir / "teacher.yaml"), use_ray=False)
    teacher_top1 = _top1(tres.stages[teacher_stage])
    t_wall = float(tres.stages[teacher_stage].get("wall_s", float("nan")))
    teacher = Cell("teacher", tspec.seed, teacher_steps, teacher_run, shown_path(jobs_dir / "teacher.yaml"), teacher_over,
                   teacher_top1, t_wall, teacher_stage in tres.skipped)
    prior = {c.run: c for c in read_csv(*prior_runs)[0]} if prior_runs else {}
    for i, (cell, spec) in enumerate(zip(cells, specs)):
        if on_run:
            on_run(cell, i, len(cells))
        if cell.method not in BASELINES and not run_exists(spec) and take_prior(cell, prior):
            continue
        run_cell(cell, spec)
        if own_images:
            cell.own_top1 = own_images_top1(cell, train)
    result = FidelityResult(teacher_top1, teacher_steps, cells)
    if preempt:
        longest = next(c for c in cells if c.method == "funmatch" and c.budget == max(budgets) and not c.variant
                       and c.seed == seeds[0])
        record = out / "preempted.json"
        earlier = json.loads(record.read_text()) if record.is_file() else None
        result.preempted = preempted(longest, kills=preempt, seed=seeds[0], earlier=earlier)
        record.write_text(json.dumps(result.preempted, indent=1))
    result.wall_s = time.perf_counter() - t0
    trained = sum(c.wall_s for c in cells if not c.skipped)
    reused = sum(c.skipped for c in cells)
    samples = load_manifest(train).num_samples
    header = (f"Student top-1 on {val} ({len(seeds)} seed(s): {', '.join(map(str, seeds))}), students trained on "
              f"{train} ({samples} images){f' as {student}' if student else ''}; teacher (on {teacher_train}) "
              f"{teacher_steps} steps ({t_wall:.0f} s when it was trained"
              f"{', reused here' if teacher.skipped else ''}). This call: {result.wall_s:.0f} s on {os.cpu_count()} "
              f"CPUs; {len(cells) - reused} runs trained here ({trained:.0f} s), {reused} found finished and reused "
              f"(their wall times are from when they were trained: {sum(c.wall_s for c in cells if c.skipped):.0f} s)."
              f"{f' Tuned scratch: {tuned.describe()}.' if tuned else ''}{_prior_note(cells, prior)}\n\n")
    result.table = write_tables(out, cells, teacher_top1, teacher_steps, header)
    write_csv(cells, out / "runs.csv", teacher)
    regime = ", ".join(x for x in (f"students on {train_split}" if train_split != "train" else "", student or "") if x)
    steps_per_epoch = samples / specs[0].data.batch_size if specs else 1.0
    plot(cells, teacher_top1, out / "fidelity.png", regime)
    if all_budgets:  # a curve over schedules: its x axis in epochs too
        plot(cells, teacher_top1, out / "fidelity_epochs.png", regime, "epochs of the student's training images",
             lambda b: round(b / steps_per_epoch, 2))
    return result


def _step_of(metrics_file: Path) -> int:
    """The last step a run's metrics file has logged (0 before the first log line)."""
    if not metrics_file.is_file():
        return 0
    last = 0
    for line in metrics_file.read_text().splitlines():
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError):
            continue  # a line cut by the kill
    return last


def weights_digest(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors (names, dtypes, shapes, bytes), whatever the file's layout."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def preempted(cell: Cell, *, kills: int, seed: int = 0, checkpoints: int = 8,
              earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cell`` again as another run (``<run>-preempted``, a checkpoint every 1/``checkpoints`` of the
    schedule), SIGKILL it ``kills`` times at random moments (once its log shows a step drawn at random between 5%
    and 95% of the schedule), each time starting the same command again; then compare its final weights with the
    uninterrupted run's, tensor by tensor. Kills are recorded with the last step logged before each. A run that
    already finished is not trained again: its kills are those of ``earlier`` (the record a previous call wrote)
    when that names this run, and the weights are compared again."""
    import random
    import signal
    import subprocess
    import sys

    from kd_cluster.config import load_job
    from kd_cluster.results import metrics_path

    run = f"{cell.run}-preempted"
    over = [f"name={run}" if o.startswith("name=") else o for o in cell.overrides]
    over += [f"schedule.checkpoint_every={max(1, cell.budget // checkpoints)}",
             f"schedule.log_every={max(1, min(20, cell.budget // 50))}"]
    spec = load_job(cell.job, over)
    check_fresh(spec)
    stage = spec.stages[-1].name if spec.stages else "main"
    log = metrics_path(spec, stage)
    final = Path(spec.storage.path) / run / stage / "model.safetensors"
    rng = random.Random(seed)
    kill_steps = sorted(rng.randint(cell.budget // 20, cell.budget * 19 // 20) for _ in range(kills))
    cmd = [sys.executable, "-m", "kd_cluster.cli", "run", cell.job, "--no-ray", *over]
    events: list[dict[str, Any]] = []
    starts = 0
    t0 = time.perf_counter()
    for step in [*kill_steps, None]:
        if final.is_file():
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        starts += 1
        if step is None:  # the last start runs to the end
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{run}: the last restart failed (exit {proc.returncode}): {err[-2000:]}")
            break
        while proc.poll() is None and _step_of(log) < step:
            time.sleep(0.2)
        if proc.poll() is not None:
            if final.is_file():  # it finished before its kill: that kill did not happen
                break
            raise RuntimeError(f"{run} ended (exit {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGKILL)  # the step the log shows, plus whatever ran since: a random moment
        proc.wait()
        events.append({"killed_after_step": _step_of(log), "at_s": round(time.perf_counter() - t0, 1)})
    wall = round(time.perf_counter() - t0, 1)
    if not starts and earlier and earlier.get("run") == run:  # finished by an earlier call, which recorded it
        events, wall = earlier.get("kills", []), earlier.get("wall_s", 0.0)
    ours, theirs = weights_digest(final), weights_digest(Path(spec.storage.path) / cell.run / stage / "model.safetensors")
    return {"run": run, "uninterrupted": cell.run, "kills": events, "sha256_preempted": ours,
            "sha256_uninterrupted": theirs, "equal": ours == theirs, "wall_s": wall}


__all__ = ["BASELINES", "FULL", "LONG_METHODS", "METHODS", "QUICK", "SCRATCH", "TUNED", "VARIANTS", "Cell",
           "Comparison", "FidelityError", "FidelityResult", "Tuned", "agreement_table", "check_fresh", "compare",
           "fit_table", "holm", "load_tuned", "own_images_top1", "loss_terms", "markdown_table", "plan_cells", "preempted", "read_csv",
           "run_cell", "run_fidelity", "run_overrides", "run_prefix", "schedule_overrides", "shown_path", "split_url",
           "stale_fields", "student_overrides", "summarize", "win_counts", "write_csv", "write_tables"]
