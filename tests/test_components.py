"""The stage's components decide their own timing and do their own work, tested one by one without a process
group or a subprocess: logger, evaluator, checkpointer, preemption check, data feed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_cluster.storage import CheckpointStore, Store
from kd_cluster.train import components
from kd_cluster.train.checkpoint import CheckpointWriter, rng_state
from kd_cluster.train.components import (Checkpointer, DataFeed, Evaluator, MetricLogger, PreemptionCheck,
                                         TrainState, itstime)
from kd_cluster.train.preempt import PreemptionFlag


class ListSink:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.logged.append((step, dict(metrics)))

    def close(self) -> None:
        pass


def test_itstime_every_period_and_the_last_step() -> None:
    assert [d for d in range(1, 11) if itstime(d, 4, 10)] == [4, 8, 10]
    assert [d for d in range(1, 11) if itstime(d, 4, 10, last=False)] == [4, 8]
    assert [d for d in range(1, 11) if itstime(d, None, 10)] == [10]
    assert [d for d in range(1, 7) if itstime(d, 2, 6)] == [2, 4, 6]  # the last step is not acted on twice


def test_metric_logger_averages_each_window_and_evaluates_after_taking_the_rate() -> None:
    sink = ListSink()
    log = MetricLogger(sink, every=3, total=5, world=1, batch_size=8)
    order: list[str] = []
    for step in range(5):
        log.add(torch.tensor(float(step)), {"kl": torch.tensor(2.0 * step)}, {"train/teacher_agreement": torch.tensor(0.5)})
        done = step + 1
        if log.should_log(done):
            def ev() -> dict[str, float]:
                order.append("eval")
                return {"eval/student_top1": 0.25}
            order.append("flush")
            log.flush(done, {"lr": 0.1}, then=ev if done == 5 else None)
    assert [s for s, _ in sink.logged] == [3, 5]
    first, last = sink.logged[0][1], sink.logged[1][1]
    assert first["loss"] == pytest.approx((0 + 1 + 2) / 3) and first["kl"] == pytest.approx(2.0)
    assert last["loss"] == pytest.approx((3 + 4) / 2) and last["kl"] == pytest.approx(7.0)
    assert first["train/teacher_agreement"] == 0.5 and first["lr"] == 0.1 and first["images_per_s"] > 0
    assert "eval/student_top1" not in first and last["eval/student_top1"] == 0.25
    assert order == ["flush", "flush", "eval"]
    log.log(5, {"eval/extra": 1.0})
    assert log.last["eval/student_top1"] == 0.25 and log.last["eval/extra"] == 1.0  # the stage's final figures


def test_evaluator_without_a_val_split_never_acts() -> None:
    calls: list[int] = []
    ev = Evaluator(lambda: calls.append(1) or {"eval/x": 1.0}, every=4, total=10)
    assert [d for d in range(1, 11) if ev.should_eval(d)] == [4, 8, 10]
    assert ev() == {"eval/x": 1.0} and calls == [1]
    none = Evaluator(None, every=4, total=10)
    assert not any(none.should_eval(d) for d in range(1, 11)) and none() == {}


def test_data_feed_checks_the_cursor_and_keeps_corrupt_counts_for_the_stage() -> None:
    batches = iter([{"step": s, "corrupt": s % 2, "key": [f"k{s}"]} for s in range(4)])
    feed = DataFeed(batches)
    feed.next(0), feed.next(1)
    w1 = feed.window_metrics()
    feed.next(2)
    w2 = feed.window_metrics()
    assert w1["corrupt_samples"] == 1.0 and w2["corrupt_samples"] == 1.0  # stage total, not per window
    assert w1["data/keys_crc"] != w2["data/keys_crc"] and w1["data_wait_s_per_step"] >= 0
    with pytest.raises(AssertionError, match="data stream at step 3, loop at 7"):
        feed.next(7)


def _state() -> TrainState:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    method = nn.Module()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainState(model, method, opt, sched, {"loader_workers": 1, "world_size": 1})


def test_checkpointer_saves_on_its_schedule_and_restores_the_step_weights_and_rng(tmp_path: Path) -> None:
    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    state = _state()
    reports: list[tuple[int, dict]] = []
    ck = Checkpointer(ckpts, state, rank=0, world=1, every=4, total=10, seconds=None,
                      writer=CheckpointWriter(ckpts, keep=2, retry_s=5), report=lambda s, m: reports.append((s, m)))
    assert [d for d in range(1, 11) if ck.should_save(d)] == [4, 8, 10]
    assert not ck.time_due()  # no time-based checkpoints configured
    ck.save(4)
    assert ck.finish("s") is not None
    assert ckpts.latest() == 4 and reports[0][0] == 4
    m = ck.pop_metrics()
    assert m["checkpoint/stall_s"] >= 0 and ck.pop_metrics() == {}  # the figures go into one log, once
    want = {k: v.clone() for k, v in state.model.state_dict().items()}
    rng_at_save = rng_state()["torch"]
    with torch.no_grad():
        state.model.weight.add_(1.0)
    torch.manual_seed(123)
    fresh = Checkpointer(ckpts, state, rank=0, world=1, every=4, total=10, seconds=None, writer=None)
    step, rng = fresh.restore("s", loader_workers=1, run="r")
    assert step == 4 and torch.equal(state.model.weight, want["weight"])
    assert torch.equal(rng["torch"], rng_at_save)
    with pytest.raises(ValueError, match="loader_workers changed from 1 to 2"):
        fresh.restore("s", loader_workers=2, run="r")


def test_checkpointer_time_based_saves_are_due_after_the_interval(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    clock = {"t": 1000.0}
    monkeypatch.setattr(components.time, "monotonic", lambda: clock["t"])
    ckpts = CheckpointStore(Store(str(tmp_path / "stage")))
    ck = Checkpointer(ckpts, _state(), rank=0, world=1, every=100, total=1000, seconds=60.0,
                      writer=CheckpointWriter(ckpts, keep=2, retry_s=5))
    clock["t"] += 59.0
    assert not ck.time_due()
    clock["t"] += 1.0
    assert ck.time_due()
    ck.save(7)
    assert not ck.time_due()  # the interval starts again at every save
    ck.finish("s")
    other_rank = Checkpointer(ckpts, _state(), rank=1, world=1, every=100, total=1000, seconds=60.0, writer=None)
    clock["t"] += 600.0
    assert not other_rank.time_due()  # rank 0 decides; the ranks agree at the check step


def test_checkpointer_finish_fails_the_stage_when_the_last_checkpoint_cannot_land(tmp_path: Path) -> None:
    class Broken(CheckpointStore):
        def write_file(self, step: int, name: str, data: bytes) -> None:
            raise OSError("store unreachable")

    ckpts = Broken(Store(str(tmp_path / "stage")))
    ck = Checkpointer(ckpts, _state(), rank=0, world=1, every=2, total=2, seconds=None,
                      writer=CheckpointWriter(ckpts, keep=2, retry_s=0.5))
    ck.save(2)
    with pytest.raises(RuntimeError, match="final checkpoint \\(step 2\\) could not be written"):
        ck.finish("distill")
    assert ckpts.latest() is None


def test_preemption_check_acts_at_its_period_on_the_flag() -> None:
    flag = PreemptionFlag()
    check = PreemptionCheck(flag, every=5, world=1)
    assert [d for d in range(1, 16) if check.should_check(d)] == [5, 10, 15]
    assert check.poll(time_due=False) == (False, False)
    assert check.poll(time_due=True) == (False, True)
    flag.request("SIGTERM")
    assert check.poll(time_due=False) == (True, False) and flag.reason == "SIGTERM"


def test_metric_logger_of_other_ranks_writes_nothing(tmp_path: Path) -> None:
    from kd_cluster.telemetry import JsonlSink, NullSink

    f = tmp_path / "m.jsonl"
    for sink in (JsonlSink(f, 0), NullSink()):
        log = MetricLogger(sink, every=1, total=1, world=1, batch_size=2)
        log.add(torch.tensor(1.0), {}, {})
        log.flush(1, {})
        sink.close()
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1]
