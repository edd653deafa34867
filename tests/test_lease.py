"""One writer per run: the run folder's lease refuses a second driver of a live run, and lets --force take over
a run whose driver stopped beating (killed, preempted), on the local store and on S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kd_cluster.storage import Store
from kd_cluster.storage.lease import LEASE, LeaseHeld, RunLease


@pytest.fixture(params=["local", "s3"])
def run_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "runs" / "r"))
    s3 = request.getfixturevalue("s3")
    s3.bucket("leases")
    return Store(f"s3://leases/{tmp_path.name}/r", endpoint_url=s3.endpoint)


def test_second_driver_is_refused_until_the_heartbeat_is_stale(run_store: Store) -> None:
    first = RunLease(run_store, timeout_s=30.0, run="r", heartbeat_s=0.3)  # far from stale under any load
    first.acquire()
    try:
        held = json.loads(run_store.read_bytes(LEASE))
        assert held["owner"] == first.info.owner and held["pid"] == os.getpid() and held["host"]
        with pytest.raises(LeaseHeld, match=f"run 'r' is being written by owner {first.info.owner} "
                                            f"\\(pid {os.getpid()} on .*\\).*add --force to take over"):
            RunLease(run_store, timeout_s=30.0, run="r").acquire()
        with pytest.raises(LeaseHeld, match="--force takes over only a lease whose heartbeat is older than"):
            RunLease(run_store, timeout_s=30.0, run="r").acquire(force=True)
        _wait_until(lambda: json.loads(run_store.read_bytes(LEASE))["heartbeat"] > held["heartbeat"],
                    "the heartbeat moves on while the first driver lives")
        # seen from a clock 60 s ahead, the first driver's heartbeat is stale: --force takes over
        taker = RunLease(run_store, timeout_s=30.0, run="r", clock=lambda: time.time() + 60)
        with pytest.raises(LeaseHeld):
            taker.acquire()
        taker.acquire(force=True)
        assert json.loads(run_store.read_bytes(LEASE))["owner"] == taker.info.owner
        _wait_until(lambda: first.lost is not None, "the first driver learns it lost the run")
        assert first.lost is not None and first.lost.owner == taker.info.owner
        first.release()  # gives back nothing that is not its own
        assert json.loads(run_store.read_bytes(LEASE))["owner"] == taker.info.owner
        taker.release()
        assert not run_store.exists(LEASE)
    finally:
        first.release()


def _wait_until(condition: Any, what: str, polls: int = 3000) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``polls`` looks (a progress count, not a
    time bound: a slow machine polls more slowly and waits longer)."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


RACES = 200


def _race(run_store: Store, rounds: int) -> tuple[int, list[int]]:
    """``rounds`` times: a driver beats every 20 ms and a second one forces a takeover while it beats. A takeover
    may be refused (the lease moved between the taker's look and its swap: it was alive); one that succeeded
    must stay. Returns (takeovers that succeeded, the rounds whose lease ended naming the deposed driver). With
    ``kd_cluster.storage.lease.FENCED = False`` the same race finds overwrites (seen by hand; as a test it depends on
    the machine's timing, so it is not one)."""
    took, overwritten = 0, []
    for n in range(rounds):
        first = RunLease(run_store, timeout_s=30.0, run="r", heartbeat_s=0.02)
        first.acquire()
        try:
            beats = json.loads(run_store.read_bytes(LEASE))["heartbeat"]
            _wait_until(lambda: json.loads(run_store.read_bytes(LEASE))["heartbeat"] > beats, "a heartbeat")
            taker = RunLease(run_store, timeout_s=30.0, run="r", clock=lambda: time.time() + 60)
            try:
                taker.acquire(force=True)
            except LeaseHeld:
                continue  # the first driver beat in between: a live lease is not taken
            took += 1
            _wait_until(lambda: first.lost is not None or  # fenced: the first driver learns it lost the run
                        json.loads(run_store.read_bytes(LEASE))["owner"] == first.info.owner,  # unfenced
                        "the deposed driver's next heartbeat")
            first._stop.set()
            first._thread.join()
            if json.loads(run_store.read_bytes(LEASE))["owner"] != taker.info.owner:
                overwritten.append(n)
            else:
                assert first.lost is not None and first.lost.owner == taker.info.owner
            taker.release()
        finally:
            first.release()
            if run_store.exists(LEASE):
                run_store.remove(LEASE)
    return took, overwritten


def test_takeover_racing_heartbeats_is_never_overwritten(run_store: Store) -> None:
    """Each heartbeat and each takeover is a compare-and-swap: a takeover that lands between a heartbeat's look
    and its write is never overwritten by the deposed driver."""
    took, overwritten = _race(run_store, RACES)
    assert overwritten == [] and took > 0, (took, overwritten)


def test_lease_of_a_process_gone_on_this_machine_is_taken_without_force(run_store: Store) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first = RunLease(run_store, timeout_s=600.0, run="r")
    first.info.pid = int(dead.stdout)
    first.acquire()
    first._stop.set()  # as if killed: the lease stays, its heartbeat fresh
    first._thread.join()
    second = RunLease(run_store, timeout_s=600.0, run="r")
    second.acquire()  # same machine, the owner's process is gone: no --force, no waiting
    assert json.loads(run_store.read_bytes(LEASE))["owner"] == second.info.owner
    second.release()
    other = RunLease(run_store, timeout_s=600.0, run="r")
    other.info.pid, other.info.machine = int(dead.stdout), "another-machine"
    other.acquire()
    other._stop.set()
    with pytest.raises(LeaseHeld):  # on another machine a pid says nothing: the heartbeat rule applies
        RunLease(run_store, timeout_s=600.0, run="r").acquire(force=True)


def _job(tiny_job: Any, storage: dict[str, Any]) -> Path:
    return tiny_job("leased", stages=[], teacher=None, method={"name": "supervised"}, student={"arch": "cnn_xs"},
                    resources={"num_workers": 1}, storage=storage, fault_tolerance={"lease_timeout_s": 15},
                    schedule={"steps": 100000, "warmup_steps": 0, "log_every": 1, "eval_every": 100000,
                              "checkpoint_every": 100000})


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_of_one_run(where: str, tiny_job: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A second `kd-cluster run` of a live run is refused with one line naming the first; after the first is
    SIGKILLed (on what looks like another machine) --force is refused while its heartbeat is fresh and takes
    the run over once it is older than fault_tolerance.lease_timeout_s."""
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        storage = {"path": f"{s3.bucket('leased')}/{tmp_path.name}", "endpoint_url": s3.endpoint}
        store = Store(f"{storage['path']}/leased", endpoint_url=s3.endpoint)
    else:
        storage = {"path": str(tmp_path / "runs")}
        store = Store(str(tmp_path / "runs" / "leased"))
    job = _job(tiny_job, storage)
    cmd = [sys.executable, "-m", "kd_cluster.cli", "run", str(job), "--no-ray"]
    metrics = tmp_path / "tel" / "metrics" / "leased" / "main.jsonl"
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not (metrics.exists() and metrics.read_text().strip()):  # waits on progress, not on the clock
            assert first.poll() is None, first.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            time.sleep(0.1)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid} on " in lines[0] and "--force" in lines[0], second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    lease = json.loads(store.read_bytes(LEASE))
    assert lease["pid"] == first.pid
    store.write_bytes(LEASE, json.dumps({**lease, "machine": "another-machine"}).encode())  # a pid means nothing
    with pytest.raises(LeaseHeld, match="--force takes over only"):
        RunLease(store, timeout_s=15, run="leased").acquire(force=True)
    while time.time() - json.loads(store.read_bytes(LEASE))["heartbeat"] <= 15:  # the dead driver's lease goes stale
        time.sleep(0.2)
    forced = subprocess.run([*cmd, "--force", "schedule.steps=2", "schedule.eval_every=2"], capture_output=True,
                            text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert not store.exists(LEASE)  # given back at the end of the run
    assert store.exists("main/stage.json")
