"""The parts of a stage that act at some steps and not at others, each deciding for itself when.

A stage is a short step loop over components built once (:mod:`kd_cluster.train.loop`). Each component
here owns its timing, in the spirit of ``itstime(step, every, total)``: the metric logger logs every
``log_every`` steps and at the last step, the evaluator evaluates every ``eval_every`` steps and at the
last step, the checkpointer saves every ``checkpoint_every`` steps, at the last step and when
``checkpoint_minutes`` have passed, and the preemption check asks the ranks every ``check_every`` steps.
Each is usable (and tested) on its own, without a process group or a subprocess.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kd_cluster.storage import CheckpointStore
from kd_cluster.telemetry import Sink
from kd_cluster.train.checkpoint import (RNG_FILE, STATE_FILE, CheckpointDamaged, CheckpointWriter,
                                         NoValidCheckpoint, UploadResult, load_verified, read_verified, rng_state,
                                         snapshot)
from kd_cluster.train.preempt import PreemptionFlag


def itstime(done: int, every: int | None, total: int, last: bool = True) -> bool:
    """Whether a component with period ``every`` acts once ``done`` steps are done: at every multiple of
    ``every`` (none when ``every`` is None) and, with ``last``, after the final step ``total``."""
    return (every is not None and done % every == 0) or (last and done == total)


def reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (nothing to do in one process)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(flags: list[bool], world: int, group: Any = None) -> list[bool]:
    """Whether any rank raised each flag (one all-reduce of a few bytes on the CPU)."""
    if world <= 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


class DataFeed:
    """The stage's batches in step order, and what the data side did in the current log window: time spent
    waiting for batches, the samples skipped as corrupt (over the whole stage), and a fingerprint of the
    sample keys this rank trained on (to check that a resumed run saw the same data)."""

    def __init__(self, batches: Iterator[dict[str, Any]]) -> None:
        self.batches = batches
        self.corrupt = 0
        self._reset()

    def _reset(self) -> None:
        self.wait_s, self.steps, self.keys_crc = 0.0, 0, 0

    def next(self, step: int) -> dict[str, Any]:
        """The batch of global step ``step``."""
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        assert batch["step"] == step, f"data stream at step {batch['step']}, loop at {step}"
        self.steps += 1
        self.corrupt += batch["corrupt"]
        self.keys_crc = zlib.crc32("\n".join(batch["key"]).encode(), self.keys_crc)
        return batch

    def window_metrics(self) -> dict[str, float]:
        """This window's figures; starts the next window."""
        out = {"data_wait_s_per_step": self.wait_s / max(self.steps, 1), "corrupt_samples": float(self.corrupt),
               "data/keys_crc": float(self.keys_crc)}
        self._reset()
        return out


class MetricLogger:
    """Sums the step's loss and terms on the device over a log window (no host sync), and at log steps
    averages them over the window and the ranks (the log step's one sync) and logs them with the other
    components' figures. Rank 0's sink writes; other ranks' sinks drop."""

    def __init__(self, sink: Sink, every: int, total: int, world: int, batch_size: int) -> None:
        self.sink, self.every, self.total, self.world, self.batch_size = sink, every, total, world, batch_size
        self._sums: torch.Tensor | None = None
        self._names: list[str] = []
        self._steps = 0
        self._t0 = time.perf_counter()
        self.last: dict[str, float] = {}
        """The most recent figures of the stage (the last log, and evaluations since)."""

    def should_log(self, done: int) -> bool:
        return itstime(done, self.every, self.total)

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        """Add one step's loss, loss terms and statistics (detached) to the window."""
        values = torch.stack([loss.detach(), *(v.detach() for v in terms.values()), *stats.values()])
        self._sums = values if self._sums is None else self._sums + values
        self._names = ["loss", *terms, *stats]
        self._steps += 1

    def flush(self, done: int, extra: dict[str, float],
              then: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
        """Log the window's averages with ``extra``, and the figures of ``then`` (an evaluation, run after the
        window's rate is taken). Collective: every rank calls it at the same step."""
        assert self._sums is not None and self._steps > 0, "a log step with no step in its window"
        sums = reduce_sum(self._sums / (self._steps * self.world), self.world).tolist()
        elapsed = time.perf_counter() - self._t0
        metrics = dict(zip(self._names, sums, strict=True))
        metrics |= extra
        metrics["images_per_s"] = self._steps * self.batch_size / max(elapsed, 1e-9)
        if then is not None:
            metrics |= then()
        self.sink.log(done, metrics)
        self.last = metrics
        self._sums, self._steps, self._t0 = None, 0, time.perf_counter()
        return metrics

    def log(self, done: int, metrics: dict[str, float]) -> None:
        """Log figures outside the window's averages (an evaluation between log steps)."""
        self.sink.log(done, metrics)
        self.last |= metrics


class Evaluator:
    """Evaluates every ``every`` steps and after the last step, with ``fn`` (None: no val split)."""

    def __init__(self, fn: Callable[[], dict[str, float]] | None, every: int, total: int) -> None:
        self.fn, self.every, self.total = fn, every, total

    def should_eval(self, done: int) -> bool:
        return self.fn is not None and itstime(done, self.every, self.total)

    def __call__(self) -> dict[str, float]:
        return self.fn() if self.fn is not None else {}


@dataclass
class TrainState:
    """What a checkpoint holds of the training, besides the RNG states."""

    model: nn.Module
    method: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    meta: dict[str, Any] = field(default_factory=dict)
    """Run metadata stored with every checkpoint (run, stage, data-cursor settings, resolved spec)."""


def unwrap(m: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return m.module if hasattr(m, "module") else m


class Checkpointer:
    """Restores the latest committed checkpoint, and saves one every ``every`` steps, after the last step and
    when ``seconds`` have passed since the last save (decided at the preemption check steps, by rank 0).

    Saving is collective (the ranks' RNG states are gathered to rank 0); rank 0 snapshots the state to host
    memory (the stall) and hands it to its background ``writer``, which uploads and commits it.
    """

    def __init__(self, ckpts: CheckpointStore, state: TrainState, *, rank: int, world: int, every: int, total: int,
                 seconds: float | None, writer: CheckpointWriter | None,
                 report: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.ckpts, self.state, self.rank, self.world = ckpts, state, rank, world
        self.every, self.total, self.seconds, self.writer = every, total, seconds, writer
        self.report = report
        self._last_save = time.monotonic()
        self._metrics: dict[str, float] = {}

    def restore(self, stage: str, loader_workers: int, run: str) -> tuple[int, dict[str, Any] | None]:
        """Load the newest committed checkpoint that verifies (rank 0 chooses it, every rank reads and verifies
        its files). Damaged newer ones are passed over with a warning; none verifying stops the stage.

        Returns its step and this rank's RNG state, which the caller sets right before the first step.
        """
        choice: tuple[int | None, dict[str, Any] | None, str | None] = (None, None, None)
        restored = None
        if self.rank == 0:
            try:
                restored = load_verified(self.ckpts)
                if restored is not None:
                    choice = (restored.step, restored.files, None)
            except NoValidCheckpoint as exc:
                choice = (None, None, str(exc))
        if self.world > 1:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        step, files, error = choice
        if error is not None:
            raise NoValidCheckpoint(error)
        if step is None:
            return 0, None
        if restored is not None:
            state, rngs = restored.state, restored.rngs
        else:  # the same files rank 0 verified; damage since then is an error, not a second choice
            try:
                state, rngs = read_verified(self.ckpts, step, files)
            except CheckpointDamaged as exc:
                raise NoValidCheckpoint(f"rank {self.rank}: checkpoint of step {step} under {self.ckpts.url()} "
                                        f"changed while the run started: {exc}") from exc
        s = self.state
        unwrap(s.model).load_state_dict(state["model"])
        s.method.load_state_dict(state["method"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.scheduler.load_state_dict(state["scheduler"])
        meta = state["meta"]
        if meta.get("loader_workers") != loader_workers:
            raise ValueError(f"data.loader_workers changed from {meta.get('loader_workers')} to "
                             f"{loader_workers}; the data cursor of run {run!r} depends on it")
        if self.rank == 0:
            note = "" if meta.get("world_size") == self.world else (
                f" (it was written by {meta.get('world_size')} workers, now {self.world}: the data order changes "
                "from here)")
            if restored is not None and restored.skipped:
                note += f" (passed over: {'; '.join(restored.skipped)})"
            if restored is not None and restored.repointed and self.writer is not None:
                # latest.json was unreadable: point it at the checkpoint chosen, from the complete folders
                self.ckpts.commit(step, self.writer.keep, {"world_size": meta.get("world_size"),
                                                           "repointed": True}, restored.files)
            sys.stdout.write(f"[{stage}] resumed from checkpoint at step {step}{note}\n")
        # a run resumed with more workers than it had: new ranks keep their fresh seeds
        return int(state["step"]), (rngs[self.rank] if self.rank < len(rngs) else None)

    def should_save(self, done: int) -> bool:
        return itstime(done, self.every, self.total)

    def time_due(self) -> bool:
        """Rank 0's view: ``seconds`` passed since the last save (the ranks agree on it at check steps)."""
        return self.seconds is not None and self.rank == 0 and time.monotonic() - self._last_save >= self.seconds

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (collective). Its figures go into the next log."""
        t0 = time.perf_counter()
        rngs: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        out: dict[str, float] = {}
        if self.writer is not None:
            s = self.state
            state = snapshot({"step": step, "model": unwrap(s.model).state_dict(), "method": s.method.state_dict(),
                              "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                              "meta": s.meta})
            waited = self.writer.submit(step, {STATE_FILE: state, RNG_FILE: rngs}, info={"world_size": self.world})
            out = {"checkpoint/stall_s": time.perf_counter() - t0, "checkpoint/wait_previous_s": waited}
            prev = self.writer.last
            if prev is not None:
                out |= {"checkpoint/bytes": float(prev.bytes), "checkpoint/upload_s": prev.upload_s,
                        "checkpoint/failed_uploads": float(sum(not r.ok for r in self.writer.results))}
        self._metrics = out
        self._last_save = time.monotonic()
        if self.report is not None:
            self.report(step, {"step": step, **out})

    def pop_metrics(self) -> dict[str, float]:
        """The last save's figures, once."""
        out, self._metrics = self._metrics, {}
        return out

    def wait_saved(self, timeout_s: float, group: Any = None) -> bool:
        """Rank 0 waits for the upload in flight (within ``timeout_s``); every rank learns whether it landed."""
        ok = False
        if self.writer is not None:
            res = self.writer.flush(max(0.0, timeout_s))
            ok = res is not None and res.ok
        if self.world > 1:
            t = torch.tensor([int(ok)], dtype=torch.int32)
            dist.broadcast(t, src=0, group=group)
            ok = bool(t.item())
        return ok

    def finish(self, stage: str) -> UploadResult | None:
        """Wait for the last upload; a final checkpoint that could not be written fails the stage."""
        if self.writer is None:
            return None
        final = self.writer.flush()
        if final is not None and not final.ok:
            raise RuntimeError(f"stage {stage!r}: the final checkpoint (step {final.step}) could not be "
                               f"written: {final.error}")
        return final


class PreemptionCheck:
    """Every ``every`` steps the ranks agree whether a stop was asked for (SIGTERM, a preemption notice) and
    whether a time-based checkpoint is due: one all-reduce of a few bytes on the CPU."""

    def __init__(self, flag: PreemptionFlag, every: int, world: int, group: Any = None) -> None:
        self.flag, self.every, self.world, self.group = flag, every, world, group

    def should_check(self, done: int) -> bool:
        return itstime(done, self.every, 0, last=False)

    def poll(self, time_due: bool) -> tuple[bool, bool]:
        """(stop now?, checkpoint now?) as every rank agrees."""
        preempted, due = agree([self.flag.requested(), time_due], self.world, self.group)
        return preempted, due


__all__ = ["Checkpointer", "DataFeed", "Evaluator", "MetricLogger", "PreemptionCheck", "TrainState", "agree",
           "itstime", "reduce_sum", "unwrap"]
