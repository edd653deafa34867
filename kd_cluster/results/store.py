"""Run folders on storage, read without torch or ray: find a run, its stages' progress, every run under a path,
the record of a failed attempt, and where a stage's metric file is.

A run folder is ``<storage.path>/<run>/``: ``job.json`` (the resolved spec it was last started with), one
folder per stage with ``model.safetensors``, an optional ``method.safetensors``, ``stage.json`` (the
completion marker: final metrics, wall time) and ``checkpoints/`` (``latest.json``, ``step_<n>/``). An
attempt that stopped on an error leaves ``failure.json`` (which stage, the error in one line); the next
attempt removes it when it starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd_cluster.config import JobSpec, stage_spec, stages_of, with_settings
from kd_cluster.storage import CheckpointStore, Store
from kd_cluster import urls
from kd_cluster.urls import absolute, join

RESOLVED_SPEC = "job.json"
"""The run's resolved spec, next to its stages (``kd-cluster resume`` needs nothing else)."""
STAGE_MARKER = "stage.json"
"""A stage's completion marker; written last, it makes the stage final."""
FAILURE = "failure.json"
"""The record of the last attempt of a run when it stopped on an error."""


class RunNotFound(ValueError):
    """No run folder (``<storage>/<run>/job.json``) where one was named."""


def find_run(run: str, storage: str = "./runs", endpoint_url: str | None = None) -> str:
    """A run's folder URL from its name (under ``storage``) or its own path/URL."""
    candidates = []
    if urls.has_scheme(run) or "/" in run or os.sep in run or run.startswith("."):
        candidates.append(absolute(run))
    candidates.append(join(absolute(storage), run))
    for url in dict.fromkeys(candidates):
        if Store(url, endpoint_url).exists(RESOLVED_SPEC):
            return url
    known = [n for n in Store(absolute(storage), endpoint_url).listdir() if not n.startswith(".")]
    raise RunNotFound(f"run {run!r}: no {RESOLVED_SPEC} at {' or '.join(dict.fromkeys(candidates))} "
                      f"(runs under {storage}: {', '.join(known) or 'none'})")


def read_job(run_url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The whole ``job.json`` of a run (``spec``, ``source``, ``saved_at``)."""
    store = Store(absolute(run_url), endpoint_url)
    if not store.exists(RESOLVED_SPEC):
        raise RunNotFound(f"no {RESOLVED_SPEC} under {run_url!r}: not a kd-cluster run folder "
                          "(expected <storage.path>/<run name>)")
    return store.read_json(RESOLVED_SPEC)


def spec_for_resume(run_url: str, endpoint_url: str | None = None) -> tuple[JobSpec, str]:
    """The stored spec of a run, pointed at the folder it was found in (so it resumes there); and its source."""
    meta = read_job(run_url, endpoint_url)
    spec = JobSpec.model_validate(meta["spec"])
    url = absolute(run_url)
    if urls.name(url) != spec.name:
        raise RunNotFound(f"{run_url}: its job.json names run {spec.name!r}, not {urls.name(url)!r}")
    spec = with_settings(spec, {"storage": {"path": urls.parent(url)}})
    return spec, meta.get("source", RESOLVED_SPEC)


def stage_specs(spec: JobSpec) -> list[tuple[str, str, JobSpec, str]]:
    """(stage name, what it trains, its effective spec, the architecture it trains) for every stage of a job."""
    out = []
    for s in stages_of(spec):
        eff = stage_spec(spec, s) if spec.stages else spec
        arch = eff.student.arch
        if s.trains == "teacher" and eff.teacher is not None:
            member = next((m for m in eff.teacher.members if m.key == s.member), None)
            arch = member.arch if member is not None else (eff.teacher.arch or arch)
        out.append((s.name, s.trains, eff, arch))
    return out


def _failure(store: Store) -> dict[str, Any] | None:
    return store.read_json(FAILURE) if store.exists(FAILURE) else None


def run_progress(run_url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """Which stage a run is in, from its storage alone: finished stages (steps, final top-1, wall time), the
    current stage's latest complete checkpoint, stages not started; and the run's state: ``finished``,
    ``failed`` (its last attempt stopped on an error, recorded in ``failure.json``) or ``in progress``
    (running, or stopped without an error record: killed, preempted, node lost)."""
    spec, _ = spec_for_resume(run_url, endpoint_url)
    root = Store(run_url, endpoint_url)
    meta = root.read_json(RESOLVED_SPEC)
    failure = _failure(root)
    stages, current = [], None
    for name, trains, eff, arch in stage_specs(spec):
        store = Store(join(run_url, name), endpoint_url)
        row: dict[str, Any] = {"stage": name, "trains": trains, "method": eff.method.name, "arch": arch,
                               "total_steps": eff.schedule.steps}
        if store.exists(STAGE_MARKER):
            m = store.read_json(STAGE_MARKER)
            fm = m.get("final_metrics", {})
            row.update(state="finished", steps=m.get("steps"), top1=fm.get("eval/student_top1"),
                       wall_s=m.get("wall_s"))
        elif current is None:
            current = name
            failed = failure is not None and failure.get("stage") == name
            row.update(state="failed" if failed else "current", checkpoint_step=CheckpointStore(store).latest())
        else:
            row.update(state="pending")
        stages.append(row)
    state = "finished" if current is None else (
        "failed" if failure is not None and failure.get("stage") == current else "in progress")
    return {"run": spec.name, "url": run_url, "source": meta.get("source"), "saved_at": meta.get("saved_at"),
            "stage": current, "finished": current is None, "state": state,
            "failure": failure if state == "failed" else None, "stages": stages}


def list_runs(storage: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The progress of every run folder directly under ``storage`` (folders without ``job.json`` are skipped),
    by name. A folder whose ``job.json`` cannot be read is listed with state ``unreadable`` and the reason."""
    root = Store(absolute(storage), endpoint_url)
    out = []
    for name in root.listdir():
        if name.startswith(".") or not root.exists(name, RESOLVED_SPEC):
            continue
        url = root.url(name)
        try:
            out.append(run_progress(url, endpoint_url))
        except (ValueError, KeyError, OSError) as exc:  # a corrupt or foreign job.json: say so, list the rest
            out.append({"run": name, "url": url, "state": "unreadable", "finished": False, "stage": None,
                        "stages": [], "failure": {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}})
    return out


def record_failure(run_url: str, endpoint_url: str | None, error: BaseException) -> None:
    """Remember that the run's current attempt stopped on ``error`` (in the stage it was in)."""
    try:
        stage = run_progress(run_url, endpoint_url)["stage"]
    except (ValueError, KeyError, OSError):
        stage = None
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    Store(run_url, endpoint_url).write_json(FAILURE, {
        "stage": stage, "error": f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": "),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid()})


@contextlib.contextmanager
def attempt(spec: JobSpec) -> Iterator[None]:
    """Around one attempt at running a job: forget an earlier attempt's failure when this one starts, and
    record this one's if it raises anything but a preemption (which stops a run in good order) or an
    interrupt. Errors raised before the run folder exists (an invalid job) record nothing."""
    url = join(absolute(spec.storage.path), spec.name)
    store = Store(url, spec.storage.endpoint_url)
    if store.exists(FAILURE):
        store.remove(FAILURE)
    try:
        yield
    except Exception as exc:
        from kd_cluster.train.preempt import Preempted  # torch-free; a stop in good order, not a failure

        if not isinstance(exc, Preempted) and store.exists(RESOLVED_SPEC):
            record_failure(url, spec.storage.endpoint_url, exc)
        raise


def write_file(url: str, data: bytes, endpoint_url: str | None = None) -> str:
    """Write a whole output file (a local path, parents created, or any fsspec URL); returns its absolute URL."""
    url = absolute(url)
    Store(urls.parent(url), endpoint_url).write_bytes(urls.name(url), data)
    return url


def metrics_path(spec: JobSpec, stage: str, metrics_dir: str | None = None) -> Path:
    """The local JSONL metric file rank 0 wrote for a stage: ``<telemetry.wandb_dir>/../metrics/<run>/<stage>.jsonl``
    (a relative ``wandb_dir`` is resolved against this directory), or ``<metrics_dir>/<run>/<stage>.jsonl``."""
    base = Path(metrics_dir) if metrics_dir else Path(absolute(spec.telemetry.wandb_dir)).parent / "metrics"
    return base / spec.name / f"{stage}.jsonl"


__all__ = ["FAILURE", "RESOLVED_SPEC", "STAGE_MARKER", "RunNotFound", "attempt", "find_run", "list_runs",
           "metrics_path", "read_job", "record_failure", "run_progress", "spec_for_resume", "stage_specs", "write_file"]
