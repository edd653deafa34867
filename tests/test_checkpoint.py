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


# --- verified checkpoints: damage after commit is passed over for the newest checkpoint that verifies ---------

def _writer_checkpoints(ckpts: CheckpointStore, steps: tuple[int, ...], keep: int = 3) -> None:
    writer = CheckpointWriter(ckpts, keep=keep, retry_s=5)
    for step in steps:
        writer.submit(step, {"state.pt": {"step": step, "w": torch.arange(step)}, "rng.pt": [{"r": step}]})
        assert writer.flush().ok


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_writer_records_sizes_and_checksums_in_latest_and_manifest(tmp_path) -> None:
    import hashlib
    import json

    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    _writer_checkpoints(ckpts, (4, 8))
    latest = json.loads((tmp_path / "stage" / "checkpoints" / "latest.json").read_text())
    assert latest["committed"] == [4, 8] and set(latest["checksums"]) == {"4", "8"}
    for step in (4, 8):
        data = ckpts.read_file(step, "state.pt")
        assert latest["checksums"][str(step)]["state.pt"] == {"size": len(data),
                                                              "sha256": hashlib.sha256(data).hexdigest()}
        assert ckpts.manifest(step) == latest["checksums"][str(step)]


@pytest.mark.parametrize("damage", ["truncated_state", "flipped_rng", "missing_state", "garbage_latest"])
def test_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, damage: str, caplog) -> None:
    from kd_cluster.train.checkpoint import load_verified

    root = tmp_path / "stage" / "checkpoints"
    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    _writer_checkpoints(ckpts, (4, 8, 12))
    step12 = root / CheckpointStore.dirname(12)
    if damage == "truncated_state":
        (step12 / "state.pt").write_bytes((step12 / "state.pt").read_bytes()[:100])
    elif damage == "flipped_rng":
        (step12 / "rng.pt").write_bytes(_flip((step12 / "rng.pt").read_bytes(), 60))
    elif damage == "missing_state":
        (step12 / "state.pt").unlink()
    else:  # latest.json garbage and the newest folder damaged: the complete folders stand in for the pointer
        (root / "latest.json").write_bytes(b"\x00{not json")
        (step12 / "state.pt").write_bytes(_flip((step12 / "state.pt").read_bytes(), 200))
    with caplog.at_level("WARNING", logger="kd_cluster.train.checkpoint"):
        restored = load_verified(ckpts)
    assert restored is not None and restored.step == 8 and restored.state["step"] == 8
    assert restored.rngs == [{"r": 8}] and restored.skipped and restored.skipped[-1].startswith("step 12: ")
    assert any("step 12" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_garbage_latest_recovers_the_newest_complete_folder(tmp_path) -> None:
    from kd_cluster.train.checkpoint import load_verified

    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    _writer_checkpoints(ckpts, (4, 8))
    ckpts.write_file(12, "state.pt", b"a writer died here")  # no manifest: never counted as complete
    (tmp_path / "stage" / "checkpoints" / "latest.json").write_text('{"step": "eight"')
    restored = load_verified(ckpts)
    assert restored is not None and restored.step == 8
    _writer_checkpoints(ckpts, (12,))  # the next commit rewrites the pointer from the complete folders
    assert ckpts.latest_info()["committed"] == [4, 8, 12]


def test_no_checkpoint_verifies_is_one_line_listing_each(tmp_path) -> None:
    from kd_cluster.train.checkpoint import NoValidCheckpoint, load_verified

    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    assert load_verified(ckpts) is None  # nothing written: a fresh start
    _writer_checkpoints(ckpts, (4, 8))
    for step in (4, 8):
        (tmp_path / "stage" / "checkpoints" / CheckpointStore.dirname(step) / "state.pt").write_bytes(b"x")
    with pytest.raises(NoValidCheckpoint) as exc:
        load_verified(ckpts)
    msg = str(exc.value)
    assert "\n" not in msg and "step 8: state.pt has 1 bytes" in msg and "step 4: state.pt has 1 bytes" in msg
    (tmp_path / "stage" / "checkpoints" / "latest.json").write_text("garbage")
    for step in (4, 8):
        (tmp_path / "stage" / "checkpoints" / CheckpointStore.dirname(step) / "manifest.json").unlink()
    with pytest.raises(NoValidCheckpoint, match="latest.json is not valid JSON.*no step folder has a complete"):
        load_verified(ckpts)


def test_checkpoints_without_checksums_still_load(tmp_path) -> None:
    """A run written before checksums were recorded: the files are checked by loading them."""
    from kd_cluster.train.checkpoint import load_verified

    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    for step in (4, 8):  # as the writer of older versions committed: files, then the pointer, no checksums
        ckpts.write_file(step, "state.pt", serialize({"step": step}))
        ckpts.write_file(step, "rng.pt", serialize([{"r": step}]))
        ckpts.commit(step, keep=3)
    assert "checksums" not in ckpts.latest_info() or not ckpts.latest_info()["checksums"]
    restored = load_verified(ckpts)
    assert restored is not None and restored.step == 8 and restored.files is None
    ckpts.write_file(8, "state.pt", serialize({"step": 8})[:500])  # damaged: it no longer loads
    restored = load_verified(ckpts)
    assert restored is not None and restored.step == 4 and "state.pt does not load" in restored.skipped[0]


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_on_s3(s3) -> None:
    from kd_cluster.train.checkpoint import load_verified

    s3.bucket("verify")
    store = Store("s3://verify/run/stage", endpoint_url=s3.endpoint)
    ckpts = CheckpointStore(store)
    _writer_checkpoints(ckpts, (4, 8))
    ckpts.write_file(8, "state.pt", ckpts.read_file(8, "state.pt")[:100])  # truncated after the commit
    restored = load_verified(ckpts)
    assert restored is not None and restored.step == 4 and "state.pt has 100 bytes" in restored.skipped[0]
    store.write_bytes("checkpoints/latest.json", b"\xff\xfe")
    assert load_verified(ckpts).step == 4


def _exact_job(tmp_path, storage) -> "Path":
    import copy

    import yaml

    from conftest import TINY

    d = copy.deepcopy(TINY)
    d.update(name="fallback", stages=[], teacher=None, method={"name": "supervised"}, student={"arch": "cnn_m"},
             resources={"num_workers": 1}, storage={"path": str(storage)},
             schedule={"steps": 12, "warmup_steps": 2, "log_every": 4, "eval_every": 12, "checkpoint_every": 4,
                       "keep_checkpoints": 3})
    d["augment"]["mixup_alpha"] = 0.0
    d["data"].update(val=None, batch_size=16, loader_workers=0)  # no eval, no loader process: seconds per run
    d["telemetry"]["wandb_dir"] = str(tmp_path / "tel" / "wandb")
    p = tmp_path / "fallback.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A --no-ray run of 12 steps (dropout in the student, checkpoints at 4, 8, 12), run once: its storage folder
    and its final weights."""
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    base = tmp_path_factory.mktemp("uninterrupted")
    job = _exact_job(base, base / "runs")
    run_job(load_job(job), str(job), use_ray=False)
    stage = base / "runs" / "fallback" / "main"
    assert CheckpointStore(Store(str(stage))).latest_info()["committed"] == [4, 8, 12]
    return base / "runs", (stage / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("damage", "resumes_at"), [("truncated_state", 8), ("flipped_rng", 8),
                                                    ("missing_files", 4), ("garbage_latest", 12)])
def test_fallback_run_ends_identical_to_the_uninterrupted_run(uninterrupted, tmp_path, capsys, damage: str,
                                                              resumes_at: int) -> None:
    """The finished run's storage, with its completion marker removed (a run stopped after its last checkpoint)
    and a checkpoint damaged: the same command resumes from the newest checkpoint that verifies, and the weights
    it ends with are bitwise those of the uninterrupted run, which passed through that checkpoint."""
    import shutil

    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    runs, final = uninterrupted
    shutil.copytree(runs, tmp_path / "runs")
    stage = tmp_path / "runs" / "fallback" / "main"
    for done in ("stage.json", "model.safetensors"):
        (stage / done).unlink()
    ck = stage / "checkpoints"
    step = {s: ck / CheckpointStore.dirname(s) for s in (4, 8, 12)}
    if damage == "truncated_state":
        (step[12] / "state.pt").write_bytes((step[12] / "state.pt").read_bytes()[:1000])
    elif damage == "flipped_rng":
        (step[12] / "rng.pt").write_bytes(_flip((step[12] / "rng.pt").read_bytes(), 300))
    elif damage == "missing_files":
        (step[12] / "state.pt").unlink()
        (step[8] / "rng.pt").unlink()
    else:
        (ck / "latest.json").write_text("{{{ not json")
    job = _exact_job(tmp_path, tmp_path / "runs")
    res = run_job(load_job(job), str(job), use_ray=False)
    assert res.stages["main"]["resumed_from"] == resumes_at
    out = capsys.readouterr().out
    assert f"resumed from checkpoint at step {resumes_at}" in out
    assert (stage / "model.safetensors").read_bytes() == final
    assert CheckpointStore(Store(str(stage))).latest() == 12


def test_no_checkpoint_verifies_stops_the_run_with_one_line(uninterrupted, tmp_path, capsys) -> None:
    import shutil

    from kd_cluster.cli import main

    runs, _ = uninterrupted
    shutil.copytree(runs, tmp_path / "runs")
    stage = tmp_path / "runs" / "fallback" / "main"
    (stage / "stage.json").unlink()
    for s in (4, 8, 12):
        (stage / "checkpoints" / CheckpointStore.dirname(s) / "state.pt").write_bytes(b"PK\x03\x04")
    job = _exact_job(tmp_path, tmp_path / "runs")
    assert main(["run", str(job), "--no-ray"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no checkpoint under" in lines[0] and all(f"step {s}: state.pt has 4 bytes" in lines[0] for s in (4, 8, 12))


def test_unreachable_store_stops_the_restore_rather_than_falling_back(tmp_path, monkeypatch) -> None:
    """An outage is no damage: falling back would drop the newer checkpoints at the next commit."""
    from kd_cluster.train.checkpoint import load_verified

    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    _writer_checkpoints(ckpts, (4, 8))

    def unreachable(step: int, name: str) -> bytes:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(ckpts, "read_file", unreachable)
    with pytest.raises(ConnectionError):
        load_verified(ckpts, retry_s=0.2)
