"""Checkpoints: what they hold, a fast snapshot on the training thread, the upload in the background.

A checkpoint of step ``n`` is these files under ``<stage>/checkpoints/step_<n>/``:

``state.pt``  model, method modules, optimizer (Shampoo's preconditioners included), LR schedule,
              step, and run metadata (run name = W&B run id, data-cursor settings, resolved spec);
``rng.pt``    the RNG states of every rank (torch CPU/CUDA, Python), gathered to rank 0;
``manifest.json``  each file's size and SHA-256 (also recorded in ``latest.json``).

The data cursor is the step itself: streams are pure functions of (seed, rank, loader worker, step).

Only rank 0 writes. On the training thread it copies the state to host memory (the only stall);
a background thread serialises the files, takes each one's size and SHA-256, uploads them with
retries, then writes the step's manifest and commits ``latest.json`` (see
:class:`~kd_cluster.storage.CheckpointStore`). A checkpoint whose upload failed is never committed,
so a resume reads the previous one.

A restore (:func:`load_verified`) checks every file against its recorded size and checksum, and that
it loads; a damaged checkpoint (truncated, a flipped byte, a file gone) is passed over with a warning
for the newest earlier one that verifies. Checkpoints written before checksums were recorded are
checked only by loading them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kd_cluster.storage import CheckpointStore, valid_checksums

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FILE = "state.pt"
RNG_FILE = "rng.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python's ``random``)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(internal), "python_gauss": gauss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def snapshot(obj: Any, _memo: dict[int, Any] | None = None) -> Any:
    """A deep copy of ``obj`` with every tensor copied to host memory; nothing shared with training.

    Handles dicts, lists, tuples and plain objects holding tensors (Shampoo keeps its preconditioners
    in such objects). Shared tensors stay shared in the copy.
    """
    memo = {} if _memo is None else _memo
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, torch.Tensor):
        out: Any = obj.detach().to("cpu", copy=True)
    elif isinstance(obj, dict):
        out = type(obj)((k, snapshot(v, memo)) for k, v in obj.items())
    elif isinstance(obj, list):
        out = [snapshot(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        out = tuple(snapshot(v, memo) for v in obj)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    elif hasattr(obj, "__dict__"):
        out = copy.copy(obj)
        memo[key] = out
        for k, v in vars(obj).items():
            setattr(out, k, snapshot(v, memo))
        return out
    else:
        out = copy.deepcopy(obj)
    memo[key] = out
    return out


def serialize(obj: Any) -> bytes:
    """torch.save into bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize(data: bytes) -> Any:
    """torch.load with ``weights_only=True``; the optimizer helper classes (Shampoo) are allowed by name."""
    from kd_cluster.optim import optimizer_safe_globals

    with torch.serialization.safe_globals(optimizer_safe_globals()):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def with_retry(fn: Callable[[], T], *, what: str, deadline_s: float, base_delay_s: float = 0.5,
               max_delay_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> tuple[T, int]:
    """Call ``fn`` until it succeeds or ``deadline_s`` passed (exponential backoff); returns (result, attempts).

    The last error is raised when the deadline passes.
    """
    start, attempt, delay = time.monotonic(), 0, base_delay_s
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except Exception as exc:  # noqa: BLE001 - any store error is retried (connection, 5xx, throttling)
            if time.monotonic() - start + delay > deadline_s:
                raise
            log.warning("%s failed (attempt %d: %s: %s); retrying in %.1f s", what, attempt,
                        type(exc).__name__, exc, delay)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)


@dataclass
class UploadResult:
    """What one background checkpoint upload did."""

    step: int
    ok: bool
    bytes: int = 0
    serialize_s: float = 0.0
    upload_s: float = 0.0
    attempts: int = 0
    error: str | None = None


class CheckpointWriter:
    """Uploads checkpoints in a background thread, one at a time, and commits each when complete.

    ``submit`` returns at once unless the previous upload is still running (then it waits: that wait
    is reported as stall). ``flush`` waits for the upload in flight.
    """

    def __init__(self, ckpts: CheckpointStore, keep: int, retry_s: float) -> None:
        self.ckpts, self.keep, self.retry_s = ckpts, keep, retry_s
        self._thread: threading.Thread | None = None
        self.last: UploadResult | None = None
        self.results: list[UploadResult] = []

    def submit(self, step: int, files: dict[str, Any], info: dict[str, Any] | None = None) -> float:
        """Start uploading ``files`` (already snapshotted) as the checkpoint of ``step``; returns seconds waited."""
        t0 = time.perf_counter()
        self.flush()
        waited = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._upload, args=(step, files, info or {}),
                                        name=f"checkpoint-upload-{step}", daemon=True)
        self._thread.start()
        return waited

    def flush(self, timeout: float | None = None) -> UploadResult | None:
        """Wait for the upload in flight (at most ``timeout`` s); returns its result (None if still running)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return None
            self._thread = None
        return self.last

    def _upload(self, step: int, files: dict[str, Any], info: dict[str, Any]) -> None:
        res = UploadResult(step=step, ok=False)
        deadline = time.monotonic() + self.retry_s
        try:
            t0 = time.perf_counter()
            blobs = {name: serialize(obj) for name, obj in files.items()}
            sums = {name: file_digest(data) for name, data in blobs.items()}
            res.serialize_s = time.perf_counter() - t0
            res.bytes = sum(len(b) for b in blobs.values())
            t1 = time.perf_counter()
            for name, data in blobs.items():
                _, n = with_retry(lambda n=name, d=data: self.ckpts.write_file(step, n, d),
                                  what=f"checkpoint step {step}: upload {name}",
                                  deadline_s=max(1.0, deadline - time.monotonic()))
                res.attempts += n
            _, n = with_retry(lambda: self.ckpts.commit(step, self.keep, {**info, "bytes": res.bytes}, sums),
                              what=f"checkpoint step {step}: commit", deadline_s=max(1.0, deadline - time.monotonic()))
            res.attempts += n
            res.upload_s = time.perf_counter() - t1
            res.ok = True
        except Exception as exc:  # noqa: BLE001 - reported to the loop; the previous checkpoint stays latest
            res.error = f"{type(exc).__name__}: {exc}"
            log.error("checkpoint of step %d was not written (%s); the previous checkpoint stays the latest",
                      step, res.error)
        self.last = res
        self.results.append(res)


def file_digest(data: bytes) -> dict[str, Any]:
    """What a manifest records of a file: its size and SHA-256."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class CheckpointDamaged(Exception):
    """One checkpoint cannot be used; the message names the file and what is wrong with it."""


class NoValidCheckpoint(RuntimeError):
    """Checkpoints exist but none verifies; the message lists what was found (one line)."""


@dataclass
class Restored:
    """A checkpoint that verified: its step, state and per-rank RNG states, and the newer ones passed over."""

    step: int
    state: dict[str, Any]
    rngs: list[dict[str, Any]]
    files: dict[str, dict[str, Any]] | None
    skipped: list[str]
    repointed: bool = False
    """Found through the step folders because ``latest.json`` could not be read."""


def _read(ckpts: CheckpointStore, step: int, name: str, retry_s: float) -> bytes | None:
    """A file's bytes, or None when it does not exist. A file that cannot be read (permissions) is damage;
    any other store error (unreachable, throttled) is retried for ``retry_s`` and then raised: an outage must
    not make a restore fall back to an older checkpoint."""

    def once() -> tuple[bytes | None, str | None]:
        try:
            return ckpts.read_file(step, name), None
        except FileNotFoundError:
            return None, None
        except (PermissionError, IsADirectoryError) as exc:  # the file, not the store: no retry helps
            return None, f"{name} cannot be read ({exc.strerror or exc})"

    (data, problem), _ = with_retry(once, what=f"checkpoint step {step}: read {name}", deadline_s=retry_s)
    if problem is not None:
        raise CheckpointDamaged(problem)
    return data


def read_verified(ckpts: CheckpointStore, step: int, files: dict[str, dict[str, Any]] | None,
                  retry_s: float = 60.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(state, per-rank RNG states) of the checkpoint of ``step``, each file checked against ``files`` (its
    recorded size and SHA-256; None for checkpoints written before they were recorded) and loaded.

    Raises :class:`CheckpointDamaged` naming the first file that is missing, differs or does not load.
    """
    names = list(files) if files is not None else [STATE_FILE, RNG_FILE]
    blobs: dict[str, bytes] = {}
    for name in names:
        data = _read(ckpts, step, name, retry_s)
        if data is None:
            if files is None and name == RNG_FILE:  # optional in checkpoints without a manifest
                continue
            raise CheckpointDamaged(f"{name} is missing")
        if files is not None:
            want = files[name]
            if len(data) != want["size"]:
                raise CheckpointDamaged(f"{name} has {len(data)} bytes, {want['size']} were written")
            if hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise CheckpointDamaged(f"{name} does not match its SHA-256")
        blobs[name] = data
    if STATE_FILE not in blobs:
        raise CheckpointDamaged(f"{STATE_FILE} is not listed in its manifest")
    loaded: dict[str, Any] = {}
    for name, data in blobs.items():
        try:
            loaded[name] = deserialize(data)
        except Exception as exc:  # noqa: BLE001 - whatever torch.load raises on a damaged file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointDamaged(f"{name} does not load ({type(exc).__name__}: {first[:200]})") from exc
    state = loaded[STATE_FILE]
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointDamaged(f"{STATE_FILE} holds no training state")
    return state, loaded.get(RNG_FILE, [])


def load_verified(ckpts: CheckpointStore, retry_s: float = 60.0) -> Restored | None:
    """The newest committed checkpoint that verifies (see :func:`read_verified`), or None when the run has none.

    Each checkpoint passed over is logged as a warning naming it and its damaged file. When ``latest.json``
    is unreadable, the step folders with a complete manifest stand in for it. Raises
    :class:`NoValidCheckpoint` when checkpoints (or a pointer) exist but none verifies. The choice depends
    only on the storage contents.
    """
    candidates, problem = ckpts.candidates()
    found: list[str] = []
    if problem is not None:
        log.warning("%s/%s: %s; looking for complete checkpoints in the step folders", ckpts.url(),
                    ckpts.LATEST, problem)
        found.append(problem)
    for step, files in candidates:
        try:
            state, rngs = read_verified(ckpts, step, files, retry_s)
        except CheckpointDamaged as exc:
            log.warning("checkpoint of step %d under %s is damaged (%s); trying the one before it",
                        step, ckpts.url(), exc)
            found.append(f"step {step}: {exc}")
            continue
        return Restored(step=step, state=state, rngs=rngs, files=files, skipped=found, repointed=problem is not None)
    if found:
        if problem is not None and not candidates:
            found.append("no step folder has a complete manifest")
        raise NoValidCheckpoint(f"no checkpoint under {ckpts.url()} verifies: {'; '.join(found)} (move that "
                                "folder aside to start this stage from step 0)")
    return None


__all__ = ["RNG_FILE", "STATE_FILE", "CheckpointDamaged", "CheckpointWriter", "NoValidCheckpoint", "Restored",
           "UploadResult", "deserialize", "file_digest", "load_verified", "read_verified",
           "rng_state", "serialize", "set_rng_state", "snapshot", "with_retry"]
