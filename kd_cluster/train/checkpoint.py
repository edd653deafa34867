"""Checkpoints: what they hold, a fast snapshot on the training thread, the upload in the background.

A checkpoint of step ``n`` is two files under ``<stage>/checkpoints/step_<n>/``:

``state.pt``  model, method modules, optimizer (Shampoo's preconditioners included), LR schedule,
              step, and run metadata (run name = W&B run id, data-cursor settings, resolved spec);
``rng.pt``    the RNG states of every rank (torch CPU/CUDA, Python), gathered to rank 0.

The data cursor is the step itself: streams are pure functions of (seed, rank, loader worker, step).

Only rank 0 writes. On the training thread it copies the state to host memory (the only stall);
a background thread serialises and uploads the files with retries, then commits ``latest.json``
(see :class:`~kd_cluster.storage.CheckpointStore`). A checkpoint whose upload failed is never
committed, so a resume reads the previous one.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kd_cluster.storage import CheckpointStore

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
            res.serialize_s = time.perf_counter() - t0
            res.bytes = sum(len(b) for b in blobs.values())
            t1 = time.perf_counter()
            for name, data in blobs.items():
                _, n = with_retry(lambda n=name, d=data: self.ckpts.write_file(step, n, d),
                                  what=f"checkpoint step {step}: upload {name}",
                                  deadline_s=max(1.0, deadline - time.monotonic()))
                res.attempts += n
            _, n = with_retry(lambda: self.ckpts.commit(step, self.keep, {**info, "bytes": res.bytes}),
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


def restore_files(ckpts: CheckpointStore, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(state, per-rank RNG states) of the committed checkpoint of ``step``."""
    state = deserialize(ckpts.read_file(step, STATE_FILE))
    rngs = deserialize(ckpts.read_file(step, RNG_FILE)) if ckpts.has_file(step, RNG_FILE) else []
    return state, rngs


__all__ = ["RNG_FILE", "STATE_FILE", "CheckpointWriter", "UploadResult", "deserialize", "restore_files", "rng_state",
           "serialize", "set_rng_state", "snapshot", "with_retry"]
