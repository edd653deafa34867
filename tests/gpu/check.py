"""The prepared GPU check (run it through ``tests/gpu/run.sh``): images/s and MFU of the Ray-free training loop.

It writes synthetic 500x375 JPEG shards (as ``kd-cluster bench data`` makes them), then, for each configuration,
builds the stage of one worker exactly as ``kd-cluster run --no-ray`` does (:class:`~kd_cluster.train.loop.
StageRunner`: loader processes, the decode step, models, optimizer) and times its steps after untimed warm-up steps
(in which ``torch.compile`` compiles):

- ``decode``: the data alone (loader plus, with GPU decode, the device-side decode step);
- ``student``: student training steps alone (supervised);
- ``teacher``: teacher forwards alone, on the same batches (the colocated teacher of a funmatch stage);
- ``colocated``: function-matching distillation with the teacher on the same GPU;

each with ``data.decode`` cpu (all cores but one as loader processes) and gpu, and the models with and without
``resources.compile``; bf16 autocast and channels-last on a GPU. It prints a table and one JSON line (images/s,
model FLOPs per image from the models themselves, MFU against ``--peak-tflops``).

``--cpu-smoke``: the same configurations with tiny models, 2 timed steps, on the CPU, the GPU decoder replaced
by its CPU stand-in and the compiler by dynamo's ``eager`` backend: it keeps this script working in ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _jpeg(seed: int) -> bytes:
    from kd_cluster.bench.data import photo_like_jpeg

    return photo_like_jpeg(np.random.default_rng(seed), 500, 375)


def write_shards(root: Path, images: int, shard_size: int) -> str:
    """Synthetic 500x375 JPEG shards (photo-like content, ~70 KB each), written with all cores."""
    from kd_cluster.data import write_split

    with ProcessPoolExecutor(os.cpu_count() or 1) as ex:
        data = list(ex.map(_jpeg, range(images), chunksize=16))
    m = write_split(((d, "jpg", i % 10) for i, d in enumerate(data)), str(root / "shards"), name="synthetic",
                    split="train", classes=[str(c) for c in range(10)], channels=3, shard_size=shard_size,
                    progress=False)
    return m.url


def model_flops(arch: str, image_size: int) -> float:
    """FLOPs of one forward pass of one image (a multiply-add counts 2), counted by torch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from kd_cluster.models import build_model

    with torch.device("meta"):
        model = build_model(arch, num_classes=1000, in_chans=3)
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def job_spec(a: argparse.Namespace, work: Path, manifest: str, teacher_weights: str, *, workload: str, decode: str,
             compile: bool, name: str) -> Any:
    from kd_cluster.config import JobSpec

    distill = workload in ("teacher", "colocated")
    return JobSpec.model_validate({
        "name": name, "seed": 0,
        "teacher": {"arch": a.teacher, "weights": teacher_weights, "placement": "colocated"} if distill else None,
        "student": {"arch": a.student},
        "method": {"name": "funmatch"} if distill else {"name": "supervised"},
        "data": {"train": manifest, "image_size": a.image_size, "batch_size": a.batch,
                 "loader_workers": a.loader_workers, "decode": decode},
        "augment": {"mixup_alpha": 1.0 if distill else 0.0},
        "schedule": {"steps": a.warmup + a.steps, "log_every": a.warmup + a.steps},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "resources": {"num_workers": 1, "use_gpu": True, "amp": True, "channels_last": True, "compile": compile},
        "storage": {"path": str(work / "runs")},
        "telemetry": {"wandb_mode": "disabled", "progress": False, "wandb_dir": str(work / "wandb")},
    })


def measure(a: argparse.Namespace, spec: Any, workload: str, device: torch.device) -> dict[str, Any]:
    """Images/s of one configuration's timed steps, and whether a model fell back from compilation."""
    from kd_cluster.data import mixup
    from kd_cluster.models import CompiledModule
    from kd_cluster.teacher import StepInput, TeacherView
    from kd_cluster.train import LocalSession, plan_job
    from kd_cluster.train.loop import StageRunner

    plan = plan_job(spec, "tests/gpu/check.py", check_data="all")[0]
    window_decoder = None
    if a.cpu_smoke:
        from kd_cluster.data.gpu_decode import pil_window_decode

        window_decoder = pil_window_decode
    with contextlib.ExitStack() as cleanup:
        runner = StageRunner(plan, LocalSession(device, window_decoder=window_decoder), None, cleanup)
        if runner.net is not None:
            runner.net.train()
        runner.method.train()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = 0.0
        for step in range(a.warmup + a.steps):
            if step == a.warmup:
                sync()
                t0 = time.perf_counter()
            batch = runner.data.next(step)
            lam = runner.lam(step)
            if workload == "decode":
                batch["image"].to(device, non_blocking=True)
            elif workload == "teacher":
                x = runner.norm(batch["image"].to(device, non_blocking=True))
                x = runner.method.expand(mixup(x, lam) if lam < 1.0 else x)
                view = TeacherView(plan.needs.teacher_view, runner.method.expand, runner.norm)
                runner.teacher.step(StepInput(batch, x, lam, view, device))
            else:
                runner._step(batch, lam, step)
        sync()
        elapsed = time.perf_counter() - t0
        fell_back = [m.what for m in (runner.net, getattr(runner.teacher, "model", None))
                     if isinstance(m, CompiledModule) and m.failed]
    return {"images_per_s": a.steps * a.batch / elapsed, "compile_fell_back": fell_back,
            "data_wait_s_per_step": runner.data.wait_s / max(runner.data.steps, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models, 2 steps, on the CPU (make test)")
    p.add_argument("--student", default="resnet50")
    p.add_argument("--teacher", default="resnet152")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (compilation happens here)")
    p.add_argument("--images", type=int, default=4096, help="synthetic JPEGs to write")
    p.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--workloads", nargs="+", default=["decode", "student", "teacher", "colocated"])
    p.add_argument("--decodes", nargs="+", default=["cpu", "gpu"])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense bf16 peak (H200: ~790)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.student, a.teacher, a.image_size, a.batch, a.steps, a.warmup = "cnn_xs", "cnn_s", 32, 4, 2, 1
        a.images, a.loader_workers = 48, 1
        os.environ.setdefault("KD_CLUSTER_COMPILE_BACKEND", "eager")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --cpu-smoke on a machine without one)", file=sys.stderr)
            return {}
        device = torch.device("cuda", 0)
        torch.backends.cudnn.benchmark = True
    from kd_cluster.models import build_model, save_weights

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kd_gpu_check_"))
    try:
        shard_size = max(1, a.images // max(2 * a.loader_workers, 1) // 2)
        manifest = write_shards(work, a.images, shard_size)
        teacher_weights = str(work / "teacher.safetensors")
        save_weights(build_model(a.teacher, num_classes=10, in_chans=3), teacher_weights)
        f_s, f_t = model_flops(a.student, a.image_size), model_flops(a.teacher, a.image_size)
        flops = {"decode": 0.0, "student": 3 * f_s, "teacher": f_t, "colocated": 3 * f_s + f_t}
        results = []
        # uncompiled first: if the machine's time runs out during compilation, those figures are already printed
        configs = [(w, d, c) for c in a.compile for w in a.workloads for d in a.decodes
                   if not (w == "decode" and c == "on")]
        for workload, decode, comp in configs:
            name = f"check-{workload}-{decode}-{comp}"
            spec = job_spec(a, work, manifest, teacher_weights, workload=workload, decode=decode,
                            compile=comp == "on", name=name)
            t0 = time.perf_counter()
            try:
                r = measure(a, spec, workload, device)
            except Exception as exc:  # noqa: BLE001 - one failing configuration must not cost the others' figures
                msg = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
                results.append({"workload": workload, "decode": decode, "compile": comp == "on", "error": msg})
                print(f"{workload:<10} decode {decode:<4} compile {comp:<3} FAILED: {msg}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rate = r["images_per_s"]
            row = {"workload": workload, "decode": decode, "compile": comp == "on", **r,
                   "flops_per_image": flops[workload],
                   "mfu": rate * flops[workload] / (a.peak_tflops * 1e12) if flops[workload] else None,
                   "config_s": time.perf_counter() - t0}
            results.append(row)
            mfu = f"{row['mfu'] * 100:6.2f}%" if row["mfu"] is not None else "      -"
            print(f"{workload:<10} decode {decode:<4} compile {comp:<3} {rate:>9.1f} images/s  MFU {mfu}  "
                  f"data wait {r['data_wait_s_per_step'] * 1000:7.1f} ms/step  ({row['config_s']:.0f} s)"
                  + (f"  compile fell back: {r['compile_fell_back']}" if r["compile_fell_back"] else ""),
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"machine": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "cpus": os.cpu_count(), "torch": torch.__version__, "student": a.student, "teacher": a.teacher,
           "image_size": a.image_size, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
           "loader_workers": a.loader_workers, "peak_tflops": a.peak_tflops, "cpu_smoke": a.cpu_smoke,
           "flops_per_image_forward": {"student": f_s, "teacher": f_t}, "results": results,
           "wall_s": time.perf_counter() - t_start}
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result and not any("error" in r for r in result["results"]) else 1)
