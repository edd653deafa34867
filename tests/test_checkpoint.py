"""Checkpoint contents and the background writer: exact optimizer state, retries while the store is
unreachable, and a checkpoint that was not fully written never becoming the one a resume reads."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from kd_cluster.config import OptimizerSpec
from kd_cluster.optim import build_optimizer, lr_factor, optimizer_step
from kd_cluster.storage import CheckpointStore, Store
from kd_cluster.train.checkpoint import CheckpointWriter, deserialize, serialize, snapshot, with_retry


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 4 * 4, 40), torch.nn.Linear(40, 5))


SHAMPOO = OptimizerSpec(name="shampoo", lr=0.01, weight_decay=1e-4,
                        shampoo={"block_size": 32, "update_every": 2, "start_step": 1, "graft": "rmsprop"})


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, 6, 6, generator=g)
        opt.zero_grad()
        net(x).square().mean().backward()
        optimizer_step(opt, "shampoo", seed=0, step=step)


def test_shampoo_state_roundtrip_is_exact() -> None:
    a = _net()
    opt_a = build_optimizer(SHAMPOO, [a], 8)
    _train(a, opt_a, range(0, 5))
    blob = serialize(snapshot({"model": a.state_dict(), "opt": opt_a.state_dict()}))
    _train(a, opt_a, range(5, 11))  # the uninterrupted run goes on (crossing preconditioner updates)

    b = _net()
    opt_b = build_optimizer(SHAMPOO, [b], 8)
    state = deserialize(blob)  # weights_only, with only Shampoo's helper classes allowed
    b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    assert "pre_conditioner" in opt_b.state_dict()["state"][0]
    torch.manual_seed(12345)  # the global RNG is elsewhere: Shampoo's randomness must not depend on it
    _train(b, opt_b, range(5, 11))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_snapshot_is_a_deep_copy() -> None:
    t = torch.ones(3)

    class Holder:
        def __init__(self) -> None:
            self.stats = [t, t]

    snap = snapshot({"a": t, "h": Holder()})
    t.add_(1)
    assert torch.equal(snap["a"], torch.ones(3)) and snap["h"].stats[0] is snap["h"].stats[1] is snap["a"]


def test_quadratic_and_cosine_decay() -> None:
    assert lr_factor(4, 100, 5, "quadratic") == pytest.approx(1.0)  # warm-up: (4 + 1) / 5
    assert lr_factor(5, 105, 5, "quadratic") == pytest.approx(1.0)
    assert lr_factor(55, 105, 5, "quadratic") == pytest.approx((1 - 0.5) ** 2)
    assert lr_factor(105, 105, 5, "quadratic") == pytest.approx(0.0)
    assert lr_factor(55, 105, 5, "cosine") == pytest.approx(0.5)


def test_with_retry_backs_off_then_gives_up() -> None:
    calls, sleeps = {"n": 0}, []

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError("connection refused")
        return "ok"

    assert with_retry(flaky, what="t", deadline_s=60, sleep=sleeps.append) == ("ok", 3)
    assert sleeps == [0.5, 1.0]
    with pytest.raises(OSError, match="refused"):
        with_retry(lambda: (_ for _ in ()).throw(OSError("refused")), what="t", deadline_s=0.2,
                   base_delay_s=0.05, sleep=time.sleep)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_store_unreachable_during_checkpoint(s3) -> None:
    """The S3 server goes away while a checkpoint uploads: the writer retries, training is not held up,
    the checkpoint lands when the server is back; one that cannot land never becomes the latest."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="flaky")
        ckpts = CheckpointStore(Store("s3://flaky/run/stage", endpoint_url=endpoint))
        writer = CheckpointWriter(ckpts, keep=3, retry_s=60)
        writer.submit(1, {"state.pt": {"w": torch.arange(10)}})
        assert writer.flush().ok and ckpts.latest() == 1

        server.stop()  # unreachable from here
        t0 = time.perf_counter()
        stall = writer.submit(2, {"state.pt": {"w": torch.arange(20)}, "rng.pt": [1, 2]})
        assert stall < 0.5 and time.perf_counter() - t0 < 0.5  # the training thread goes on
        time.sleep(3)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        threading.Timer(0.0, server.start).start()
        res = writer.flush(timeout=60)
        assert res is not None and res.ok and res.attempts > 2, res
        assert ckpts.latest() == 2 and torch.equal(deserialize(ckpts.read_file(2, "state.pt"))["w"], torch.arange(20))

        server.stop()  # now down for longer than the writer's retry budget
        short = CheckpointWriter(ckpts, keep=3, retry_s=2)
        short.submit(3, {"state.pt": {"w": torch.arange(30)}})
        res = short.flush(timeout=60)
        assert res is not None and not res.ok and res.error
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert ckpts.latest() == 2  # the resume point is the last complete checkpoint
    finally:
        server.stop()
