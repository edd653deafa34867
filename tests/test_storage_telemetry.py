"""Checkpoint storage (local and S3) with its atomic latest pointer; metric sinks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_cluster.config import TelemetrySpec
from kd_cluster.storage import CheckpointStore, Store
from kd_cluster.telemetry import JsonlSink, WandbSink, resolve_wandb_mode, wandb_run_id


def _ckpt_dir(tmp_path: Path, step: int) -> Path:
    d = tmp_path / f"local-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "state.pt").write_bytes(f"state {step}".encode())
    (d / "sub" / "rng-rank1.pt").write_bytes(f"rng {step}".encode())
    return d


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "stage"))
    s3 = request.getfixturevalue("s3")
    s3.bucket("ckpts")
    return Store(f"s3://ckpts/{tmp_path.name}/stage", endpoint_url=s3.endpoint)


def test_checkpoints_latest_and_prune(store: Store, tmp_path: Path) -> None:
    ck = CheckpointStore(store)
    assert ck.latest() is None
    for step in (10, 20, 30):
        ck.save(_ckpt_dir(tmp_path, step), step, keep=2)
    assert ck.latest() == 30 and ck.steps() == [20, 30]
    out = tmp_path / "restored"
    ck.fetch(30, out)
    assert (out / "state.pt").read_bytes() == b"state 30" and (out / "sub" / "rng-rank1.pt").read_bytes() == b"rng 30"


def test_interrupted_upload_never_becomes_latest(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = CheckpointStore(store)
    ck.save(_ckpt_dir(tmp_path, 1), 1, keep=3)
    real = store.write_bytes
    calls = {"n": 0}

    def flaky(rel: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the checkpoint fails mid-upload
            raise OSError("connection reset")
        real(rel, data)

    monkeypatch.setattr(store, "write_bytes", flaky)
    with pytest.raises(OSError):
        ck.save(_ckpt_dir(tmp_path, 2), 2, keep=3)
    assert ck.latest() == 1  # a reader still gets the complete checkpoint


def test_write_json_roundtrip_and_atomic_local(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "x"))
    st.write_json("a/b.json", {"k": 1})
    assert st.read_json("a/b.json") == {"k": 1}
    assert [p.name for p in (tmp_path / "x" / "a").iterdir()] == ["b.json"]  # no temp files left


def test_jsonl_sink_drops_records_past_resume_step(tmp_path: Path) -> None:
    f = tmp_path / "m.jsonl"
    s = JsonlSink(f, resume_step=0)
    for step in (5, 10, 15):
        s.log(step, {"loss": float(step)})
    s.close()
    s = JsonlSink(f, resume_step=10)  # resumed from the checkpoint of step 10: step 15 is logged again
    s.log(15, {"loss": 1.5})
    s.close()
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15] and rows[-1]["loss"] == 1.5


def test_wandb_mode_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode(TelemetrySpec()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(TelemetrySpec()) == "online"
    assert resolve_wandb_mode(TelemetrySpec(wandb_mode="disabled")) == "disabled"
    assert wandb_run_id("demo-20261122.a_b") == "demo-20261122.a_b"


@pytest.mark.slow
def test_wandb_offline_run_uses_run_name_as_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = TelemetrySpec(wandb_dir=str(tmp_path / "wandb"))
    sink = WandbSink(spec, "my-run", {"a": 1}, step_offset=100)
    sink.log(5, {"distill/kl": 0.5})
    sink.close()
    assert sink.mode == "offline" and sink.dir and sink.dir.endswith("-my-run")
    assert any(p.suffix == ".wandb" for p in Path(sink.dir).iterdir())
