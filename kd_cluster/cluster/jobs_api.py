"""Cluster operations over the Ray Jobs API: submit, status, logs, stop, list, resume. (A run's progress read
from its storage alone is :mod:`kd_cluster.results`; re-exported here.)

A submission ships the fully resolved job spec (``extends:``, profile and overrides applied) as a file in
the job's ``working_dir`` and, by default, this copy of the ``kd_cluster`` package as a ``py_modules`` entry,
so the cluster runs exactly the code and the job that were validated here; the entrypoint is the ordinary
driver, ``python -m kd_cluster.cli run <spec file>``. Credentials travel only as ``runtime_env`` environment
variables, copied by name from the submitter's environment: they are never written to a file and never
printed (``metadata`` and everything shown by ``list``/``status`` carry names only).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from kd_cluster.config import JobSpec, with_settings
from kd_cluster.results.store import RunNotFound, find_run, run_progress, spec_for_resume
from kd_cluster.urls import absolute, is_remote

# Forwarded by name when set in the submitter's environment (values never leave the runtime_env).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "WANDB_API_KEY", "WANDB_ENTITY",
                 "WANDB_BASE_URL")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
META_RUN, META_JOB, META_STORAGE, META_TOOL = "kd_cluster_run", "kd_cluster_job_file", "kd_cluster_storage", "tool"


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or it refused a request; the message is one line."""


def _one_line(exc: BaseException) -> str:
    """The gist of an exception in one line (server replies may carry a whole remote traceback)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and any(ln.startswith("Traceback") for ln in lines):
        return f"{lines[0].split('Traceback')[0].strip()} {lines[-1]}".strip()
    return " ".join(lines)[:500]


def cluster_address(address: str | None) -> str:
    """The Jobs API address: ``--address`` or ``RAY_ADDRESS``; must be the dashboard's http(s) URL."""
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if not addr.startswith(("http://", "https://")):
        raise ClusterError(f"cluster address {addr!r}: the Jobs API is the dashboard's URL, e.g. "
                           "http://127.0.0.1:8265 (kubectl port-forward or `ray dashboard` tunnel to the head)")
    return addr.rstrip("/")


def is_loopback(address: str) -> bool:
    """Whether an address points at this machine (then local paths mean the same thing on both sides)."""
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client(address: str | None) -> Any:
    """A connected ``JobSubmissionClient``; any connection problem becomes a one-line :class:`ClusterError`."""
    from ray.job_submission import JobSubmissionClient

    addr = cluster_address(address)
    try:
        return JobSubmissionClient(addr)
    except Exception as exc:  # ConnectionError, ValueError (malformed), version mismatches, ...
        raise ClusterError(f"cannot reach the Ray Jobs API at {addr}: {_one_line(exc)}") from None


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        msg = _one_line(exc)
        if "404" in msg or "does not exist" in msg:
            raise ClusterError(f"{what}: no such job on the cluster") from None
        raise ClusterError(f"{what}: {msg}") from None


# -- submit ----------------------------------------------------------------------------------------------------


def forwarded_env(extra: list[str] | None = None, defaults: bool = True) -> dict[str, str]:
    """Environment variables (by name) to hand to the job: the credential list plus ``extra`` names, when set."""
    names = [*(FORWARDED_ENV if defaults else ()), *(extra or [])]
    for n in extra or []:
        if not n or "=" in n:
            raise ValueError(f"--env takes a variable NAME (its value is read from your environment), got {n!r}")
    return {n: os.environ[n] for n in dict.fromkeys(names) if n in os.environ}


def wandb_target(spec: JobSpec, env_has_key: bool) -> str:
    """Where the job's metrics go in W&B, as far as known before it starts (run id = run name)."""
    t = spec.telemetry
    if t.wandb_mode == "disabled":
        return "disabled"
    entity = t.wandb_entity or os.environ.get("WANDB_ENTITY")
    path = f"{entity or '<your W&B entity>'}/{t.wandb_project}/runs/{spec.name}"
    if t.wandb_mode == "offline" or (t.wandb_mode == "auto" and not env_has_key):
        return (f"offline under telemetry.wandb_dir (wandb sync uploads it to {path})" if t.wandb_mode == "offline"
                else f"https://wandb.ai/{path} if the cluster has WANDB_API_KEY, else offline")
    return f"https://wandb.ai/{path}"


def _localize(spec: JobSpec, address: str) -> tuple[JobSpec, list[str]]:
    """Relative local paths resolved against this directory for a cluster on this machine; warnings otherwise."""
    notes: list[str] = []
    local = is_loopback(address)
    changes: dict[str, dict[str, str]] = {}
    if not is_remote(spec.storage.path):
        if local:
            changes["storage"] = {"path": absolute(spec.storage.path)}
        else:
            notes.append(f"storage.path {spec.storage.path!r} is a folder on the cluster node that runs the driver: "
                         "workers on other nodes, and a resume after the node is lost, need shared storage "
                         "(storage.path=s3://bucket/prefix)")
    if local and not is_remote(spec.telemetry.wandb_dir):
        changes["telemetry"] = {"wandb_dir": absolute(spec.telemetry.wandb_dir)}
    for f in ("train", "val"):
        v = getattr(spec.data, f)
        if local and v and not is_remote(v):  # builtin:// sets are remote: built where they are read
            changes.setdefault("data", {})[f] = absolute(v)
    return with_settings(spec, changes), notes


@dataclass
class Submission:
    """What was sent (no credential values: ``env_names`` lists the forwarded variables by name)."""

    submission_id: str
    run: str
    job_file: str
    storage: str
    wandb: str
    entrypoint: str
    env_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def submission_id(run: str) -> str:
    """``kdc-<run>-<UTC time>-<4 hex>``: readable in ``list``, unique per submission."""
    return f"kdc-{run}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:4]}"


def _spec_file_name(source: str) -> str:
    """The shipped spec keeps the job file's relative name (so the run records the same source)."""
    p = Path(source)
    if p.is_absolute() or ".." in p.parts:
        return p.name
    return p.as_posix()


def active_jobs_of_run(c: Any, run: str, storage: str) -> list[str]:
    """Submission ids of unfinished jobs that drive the same run (same name and storage)."""
    jobs = _call("list jobs", c.list_jobs)
    return [j.submission_id for j in jobs
            if (j.metadata or {}).get(META_RUN) == run and (j.metadata or {}).get(META_STORAGE) == storage
            and str(getattr(j.status, "value", j.status)) not in TERMINAL]


def submit(spec: JobSpec, source: str, address: str | None, *, extra_env: list[str] | None = None,
           forward_defaults: bool = True, ship_code: bool = True) -> Submission:
    """Send a validated job to the cluster; returns what was sent (names only for the environment)."""
    from kd_cluster.cluster.driver import run_root

    addr = cluster_address(address)
    env = forwarded_env(extra_env, forward_defaults)
    spec, notes = _localize(spec, addr)
    c = client(addr)
    root = run_root(spec) if is_remote(spec.storage.path) or os.path.isabs(spec.storage.path) else \
        posixpath.join(spec.storage.path, spec.name)
    busy = active_jobs_of_run(c, spec.name, root)
    if busy:
        raise ClusterError(f"run {spec.name!r} is already being driven by job {busy[0]} (not finished): two drivers "
                           f"would write the same checkpoints; stop it first (kd-cluster stop {busy[0]})")
    sid = submission_id(spec.name)
    rel = _spec_file_name(source)
    staging = Path(tempfile.mkdtemp(prefix="kdc-submit-"))
    try:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"# {source}, resolved by kd-cluster submit (extends, profile and overrides applied)\n"
                          + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        runtime_env: dict[str, Any] = {"working_dir": str(staging)}
        if ship_code:
            import kd_cluster

            runtime_env["py_modules"] = [str(Path(kd_cluster.__file__).resolve().parent)]
            runtime_env["excludes"] = ["__pycache__", "*.pyc"]
        if env:
            runtime_env["env_vars"] = env
        entrypoint = f"python -m kd_cluster.cli run {rel}"
        wandb = wandb_target(spec, "WANDB_API_KEY" in env)
        metadata = {META_TOOL: "kd-cluster", META_RUN: spec.name, META_JOB: source, META_STORAGE: root}
        _call("submit", c.submit_job, entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
              metadata=metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Submission(submission_id=sid, run=spec.name, job_file=source, storage=root, wandb=wandb,
                      entrypoint=entrypoint, env_names=sorted(env), notes=notes)


# -- status, list, logs, stop ----------------------------------------------------------------------------------


def _row(j: Any) -> dict[str, Any]:
    """A job's public fields; the runtime_env is reduced to the NAMES of its variables."""
    md = dict(j.metadata or {})
    renv = j.runtime_env or {}
    start, end = j.start_time, j.end_time
    return {"submission_id": j.submission_id, "job_id": j.job_id, "status": str(getattr(j.status, "value", j.status)),
            "run": md.get(META_RUN), "job_file": md.get(META_JOB), "storage": md.get(META_STORAGE),
            "entrypoint": j.entrypoint, "message": j.message,
            "start_time": start / 1000 if start else None, "end_time": end / 1000 if end else None,
            "duration_s": round(((end or time.time() * 1000) - start) / 1000, 1) if start else None,
            "env_names": sorted((renv.get("env_vars") or {}).keys()), "metadata": md}


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first."""
    c = client(address)
    return sorted((_row(j) for j in _call("list jobs", c.list_jobs)), key=lambda r: r["start_time"] or 0)


def job_status(address: str | None, job: str) -> dict[str, Any]:
    """One job's status row."""
    c = client(address)
    return _row(_call(f"job {job}", c.get_job_info, job))


def job_logs(address: str | None, job: str, follow: bool, write: Callable[[str], Any]) -> None:
    """The job's driver log; with ``follow``, streamed until the job ends."""
    c = client(address)
    if not follow:
        write(_call(f"logs of job {job}", c.get_job_logs, job))
        return
    _call(f"job {job}", c.get_job_info, job)  # a clear error for an unknown id before streaming

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise ClusterError(f"logs of job {job}: {_one_line(exc)}") from None


def stop_job(address: str | None, job: str, wait_s: float = 0.0) -> str:
    """Ask the cluster to stop a job; optionally wait until it is terminal; returns its status."""
    c = client(address)
    _call(f"job {job}", c.get_job_info, job)
    _call(f"stop job {job}", c.stop_job, job)
    deadline = time.monotonic() + wait_s
    while True:
        status = str(getattr(s := _call(f"job {job}", c.get_job_status, job), "value", s))
        if status in TERMINAL or time.monotonic() >= deadline:
            return status
        time.sleep(0.5)


def wait_job(address: str | None, job: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll a job until it is terminal or the timeout passes; returns its last status."""
    c = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(getattr(s := _call(f"job {job}", c.get_job_status, job), "value", s))
        if status in TERMINAL or time.monotonic() >= deadline:
            return status
        time.sleep(poll_s)


__all__ = ["FORWARDED_ENV", "ClusterError", "RunNotFound", "Submission", "cluster_address", "find_run",
           "forwarded_env", "job_logs", "job_status", "list_jobs", "run_progress", "spec_for_resume", "stop_job",
           "submit", "submission_id", "wait_job", "wandb_target"]
