"""Checkpoint storage (local and S3) with its atomic latest pointer; metric sinks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_cluster.config import TelemetrySpec
from kd_cluster.storage import CheckpointStore, Store
from kd_cluster.telemetry import JsonlSink, WandbSink, resolve_wandb_mode, wandb_run_id


def _write(ck: CheckpointStore, step: int, keep: int) -> None:
    ck.write_file(step, "state.pt", f"state {step}".encode())
    ck.write_file(step, "rng.pt", f"rng {step}".encode())
    ck.commit(step, keep)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "stage"))
    s3 = request.getfixturevalue("s3")
    s3.bucket("ckpts")
    return Store(f"s3://ckpts/{tmp_path.name}/stage", endpoint_url=s3.endpoint)


def test_checkpoints_latest_and_prune(store: Store) -> None:
    ck = CheckpointStore(store)
    assert ck.latest() is None
    for step in (10, 20, 30):
        _write(ck, step, keep=2)
    assert ck.latest() == 30 and ck.steps() == [20, 30]
    assert ck.read_file(30, "state.pt") == b"state 30" and ck.read_file(30, "rng.pt") == b"rng 30"
    assert ck.latest_info()["committed"] == [20, 30]


def test_uncommitted_checkpoints_are_never_latest_nor_prune_committed_ones(store: Store) -> None:
    ck = CheckpointStore(store)
    _write(ck, 10, keep=1)
    ck.write_file(20, "state.pt", b"half")  # a writer died before writing rng.pt and committing
    assert ck.latest() == 10 and ck.steps() == [10, 20]
    _write(ck, 15, keep=1)  # a resumed run commits an older step: the newer partial folder must not count
    assert ck.latest() == 15 and ck.read_file(15, "state.pt") == b"state 15"
    assert 20 in ck.steps() and 10 not in ck.steps()
    _write(ck, 20, keep=1)  # reaching step 20 again overwrites the partial folder and commits it
    assert ck.latest() == 20 and ck.read_file(20, "state.pt") == b"state 20" and ck.steps() == [20]


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
