"""``kd-cluster bench checkpoint``: what a checkpoint of a real student costs.

For a model with its optimizer state (ResNet-50 + Shampoo by default): bytes per checkpoint, the
training-thread stall (host snapshot + hand-off), background serialise + upload seconds, and restore
seconds (download + load into model and optimizer), against an S3 server on 127.0.0.1 (moto, started
here) or any storage URL; plus one training step's time on the same machine for comparison.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch

from kd_cluster.config import OptimizerSpec
from kd_cluster.models import build_model, count_parameters
from kd_cluster.optim import build_optimizer, optimizer_step
from kd_cluster.storage import CheckpointStore, Store
from kd_cluster.train.checkpoint import CheckpointWriter, deserialize, snapshot


def _local_s3() -> tuple[Any, str, str]:
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # moto is a test dependency
        raise RuntimeError("bench checkpoint needs moto[server] for its local S3 server (pip install -e '.[test]'), "
                           "or pass --storage URL") from exc
    import os

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, "s3://bench/ckpt", endpoint


def run(arch: str = "resnet50", optimizer: str = "shampoo", *, image_size: int = 224, batch_size: int = 16,
        repeats: int = 3, storage: str | None = None, endpoint_url: str | None = None,
        block_size: int = 128) -> dict[str, Any]:
    """Measure; returns a dict of figures (see module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000).to(device)
    spec = OptimizerSpec(name=optimizer, lr=0.1, weight_decay=1e-4,
                         shampoo={"block_size": block_size, "start_step": 10**9, "update_every": 10**9})
    opt = build_optimizer(spec, [model], batch_size)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer_step(opt, optimizer, 0, i)

    step(0)  # allocates the optimizer state (Shampoo: statistics and preconditioners per block)
    step_times = []
    for i in range(1, 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)

    server = None
    if storage is None:
        server, storage, endpoint_url = _local_s3()
    try:
        ckpts = CheckpointStore(Store(storage, endpoint_url))
        writer = CheckpointWriter(ckpts, keep=2, retry_s=120)
        stalls, uploads, serials, restores, nbytes = [], [], [], [], 0
        for r in range(repeats):
            t0 = time.perf_counter()
            state = snapshot({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": r})
            writer.submit(r + 1, {"state.pt": state})
            stalls.append(time.perf_counter() - t0)
            res = writer.flush()
            assert res is not None and res.ok, res
            uploads.append(res.upload_s)
            serials.append(res.serialize_s)
            nbytes = res.bytes
            t1 = time.perf_counter()
            back = deserialize(ckpts.read_file(ckpts.latest(), "state.pt"))
            model.load_state_dict(back["model"])
            opt.load_state_dict(back["optimizer"])
            restores.append(time.perf_counter() - t1)
    finally:
        if server is not None:
            server.stop()
    med = statistics.median
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ", no GPU"),
        "device": device.type, "arch": arch, "params": count_parameters(model), "optimizer": optimizer,
        "block_size": block_size, "storage": "local S3 server (moto, 127.0.0.1)" if server else storage,
        "bytes": nbytes, "stall_s": med(stalls), "serialize_s": med(serials), "upload_s": med(uploads),
        "restore_s": med(restores), "train_step_s": med(step_times), "batch_size": batch_size,
        "image_size": image_size, "repeats": repeats,
    }


def format_report(r: dict[str, Any]) -> str:
    """A small table of the figures."""
    rows = [
        ("checkpoint size", f"{r['bytes'] / 2**20:.0f} MiB"),
        ("training stall per checkpoint (snapshot to host)", f"{r['stall_s']:.3f} s"),
        ("background serialise", f"{r['serialize_s']:.2f} s"),
        ("background upload + commit", f"{r['upload_s']:.2f} s"),
        ("restore (download + load)", f"{r['restore_s']:.2f} s"),
        (f"one training step (batch {r['batch_size']}, {r['image_size']} px)", f"{r['train_step_s']:.2f} s"),
        ("stall / step", f"{r['stall_s'] / r['train_step_s']:.2f}"),
    ]
    head = (f"checkpoint bench: {r['arch']} ({r['params'] / 1e6:.1f}M params) + {r['optimizer']} "
            f"(block {r['block_size']}) on {r['device']}; {r['machine']}; storage: {r['storage']}; "
            f"median of {r['repeats']}")
    width = max(len(a) for a, _ in rows)
    return "\n".join([head, *(f"  {a:<{width}}  {b}" for a, b in rows)])




__all__ = ["format_report", "run"]
