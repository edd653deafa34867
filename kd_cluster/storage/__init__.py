"""Checkpoints and artifacts over fsspec (local folders, s3://, gs://, ...), with an atomic "latest".

Credentials never pass through here: s3fs/botocore read them from the environment. Only the
endpoint of an S3-compatible store is configured.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

from fsspec.core import url_to_fs

from kd_cluster.urls import absolute, is_remote, join


def storage_options(url: str, endpoint_url: str | None) -> dict[str, Any]:
    """fsspec options for ``url``: the custom S3 endpoint when one is given (or in AWS_ENDPOINT_URL)."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def store_errors() -> tuple[type[BaseException], ...]:
    """What reading or writing a store raises when the store, not the code, is at fault: fsspec's OSErrors, and
    botocore's own errors (no credentials, a bad endpoint), which s3fs lets through untranslated."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no S3 support installed: nothing more to catch
        return errors
    return (*errors, BotoCoreError)


def describe_store_error(exc: BaseException) -> str:
    """One line naming what went wrong with a store, with the fix where it is known."""
    text = str(exc) or type(exc).__name__
    if type(exc).__name__ == "NoCredentialsError":
        text += (" (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, where this runs; "
                 "on a cluster, in the workers' environment)")
    return text


class Store:
    """A folder on any fsspec filesystem with atomic small-file writes."""

    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        self.root = absolute(root)
        self.fs, self.path = url_to_fs(self.root, **storage_options(self.root, endpoint_url))
        self.local = not is_remote(self.root)

    def url(self, *parts: str) -> str:
        """The URL of a file under the root."""
        return join(self.root, *parts)

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts) if parts else self.path

    def exists(self, *parts: str) -> bool:
        """Whether a file or folder exists under the root."""
        return self.fs.exists(self._p(*parts))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file so that readers see either the old or the complete new content."""
        target = self._p(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:  # one PUT: object stores publish an object only when it is complete
            self.fs.pipe_file(target, data)

    def read_bytes(self, rel: str) -> bytes:
        """Read a whole file."""
        return self.fs.cat_file(self._p(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        """Atomic JSON write."""
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        """Read a JSON file."""
        return json.loads(self.read_bytes(rel))

    def remove(self, rel: str) -> None:
        """Remove a file or folder if it exists."""
        if self.fs.exists(self._p(rel)):
            self.fs.rm(self._p(rel), recursive=True)

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        p = self._p(rel) if rel else self.path
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))


class CheckpointStore:
    """Step-numbered checkpoint folders plus a ``latest.json`` pointer written last (the commit).

    A checkpoint's files are written under ``step_<n>/`` first, then its ``manifest.json`` (each file's
    size and SHA-256); only then does ``commit`` rewrite ``latest.json``, in one atomic write (a rename
    locally, one PUT on object stores). Readers follow ``latest.json``, so a checkpoint that was not
    fully written is never read. ``latest.json`` lists the committed steps with their files' sizes and
    checksums, so a restore can verify what it reads (see :func:`kd_cluster.train.checkpoint.load_verified`);
    when ``latest.json`` itself cannot be read, the step folders whose manifest is complete stand in for
    it. Pruning removes only committed steps beyond ``keep`` and unfinished folders older than the latest
    commit (a folder newer than it may belong to a writer still at work, and is overwritten when its step
    is reached again).
    """

    LATEST = "latest.json"
    MANIFEST = "manifest.json"

    def __init__(self, store: Store, prefix: str = "checkpoints") -> None:
        self.store = store
        self.prefix = prefix

    @staticmethod
    def dirname(step: int) -> str:
        """The folder name of a step's checkpoint."""
        return f"step_{step:09d}"

    def _rel(self, *parts: str) -> str:
        return posixpath.join(self.prefix, *parts)

    def url(self) -> str:
        """The URL of the checkpoint folder."""
        return self.store.url(self.prefix)

    def write_file(self, step: int, name: str, data: bytes) -> None:
        """Write one file of the (uncommitted) checkpoint of ``step``."""
        self.store.write_bytes(self._rel(self.dirname(step), name), data)

    def commit(self, step: int, keep: int, info: dict[str, Any] | None = None,
               files: dict[str, dict[str, Any]] | None = None) -> None:
        """Make ``step`` the latest checkpoint (after all its files are written), then prune.

        ``files``: each file's ``{"size", "sha256"}``, written to the step's manifest and to ``latest.json``.
        """
        pointer, _ = self.pointer()
        if pointer is None:  # no pointer yet, or an unreadable one: the complete folders stand in for it
            complete = self.manifests()
            pointer = {"committed": [s for s, _ in complete], "checksums": {str(s): m for s, m in complete}}
        if files is not None:
            self.store.write_json(self._rel(self.dirname(step), self.MANIFEST), {"step": step, "files": files})
        committed = sorted({int(s) for s in pointer.get("committed", []) if int(s) < step}) + [step]
        old_sums = pointer.get("checksums") or {}
        sums = {str(s): old_sums[str(s)] for s in committed[-keep:] if str(s) in old_sums}
        if files is not None:
            sums[str(step)] = files
        self.store.write_json(self._rel(self.LATEST), {**(info or {}), "step": step, "dir": self.dirname(step),
                                                        "committed": committed[-keep:], "checksums": sums})
        for old in committed[:-keep]:
            self.store.remove(self._rel(self.dirname(old)))
        for stale in self.steps():
            if stale < step and stale not in committed:
                self.store.remove(self._rel(self.dirname(stale)))

    def pointer(self) -> tuple[dict[str, Any] | None, str | None]:
        """(``latest.json``, None), (None, None) when there is none, or (None, why) when it cannot be read."""
        rel = self._rel(self.LATEST)
        try:
            if not self.store.exists(rel):
                return None, None
            obj = self.store.read_json(rel)
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
                return None, f"{self.LATEST} has no step"
            committed = obj.get("committed", [obj["step"]])
            sums = obj.get("checksums", {})
            if not isinstance(committed, list) or not all(isinstance(s, int) for s in committed) or \
                    not isinstance(sums, dict):
                return None, f"{self.LATEST} has a malformed list of committed steps"
            return obj, None
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"{self.LATEST} is not valid JSON ({type(exc).__name__})"

    def _pointer(self) -> dict[str, Any]:
        return self.pointer()[0] or {}

    def manifest(self, step: int) -> dict[str, dict[str, Any]] | None:
        """The files listed in the manifest of ``step``'s folder, or None (no manifest, or an unreadable one)."""
        rel = self._rel(self.dirname(step), self.MANIFEST)
        try:
            if not self.store.exists(rel):
                return None
            obj = self.store.read_json(rel)
        except (ValueError, UnicodeDecodeError, FileNotFoundError):
            return None
        if not isinstance(obj, dict) or obj.get("step") != step or not valid_checksums(obj.get("files")):
            return None
        return obj["files"]

    def manifests(self) -> list[tuple[int, dict[str, dict[str, Any]]]]:
        """(step, files) of the step folders that carry a readable manifest, newest first."""
        out = []
        for step in reversed(self.steps()):
            files = self.manifest(step)
            if files is not None:
                out.append((step, files))
        return out

    def candidates(self) -> tuple[list[tuple[int, dict[str, dict[str, Any]] | None]], str | None]:
        """The checkpoints a restore may use, newest first, each with its files' expected size and checksum
        (None: written before checkpoints carried checksums), and why ``latest.json`` was not usable (or None).

        From ``latest.json`` when it can be read: its committed steps. Otherwise (missing or unreadable) from
        the step folders whose manifest is complete. A pure function of the storage contents, so every rank
        that asks gets the same answer.
        """
        pointer, problem = self.pointer()
        if pointer is None:
            return [(s, f) for s, f in self.manifests()], problem
        sums = pointer.get("checksums") or {}
        steps = sorted({int(pointer["step"]), *(int(s) for s in pointer.get("committed", []))}, reverse=True)
        out: list[tuple[int, dict[str, dict[str, Any]] | None]] = []
        for s in steps:
            files = sums.get(str(s))
            out.append((s, files if valid_checksums(files) else None))
        return out, None

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders present (complete or not), ascending."""
        return sorted(int(n[5:]) for n in self.store.listdir(self.prefix) if n.startswith("step_") and n[5:].isdigit())

    def latest(self) -> int | None:
        """The step ``latest.json`` points at, or None (none, or unreadable)."""
        pointer = self._pointer()
        return int(pointer["step"]) if pointer else None

    def latest_info(self) -> dict[str, Any]:
        """The whole ``latest.json`` (step, committed steps, checksums, what the writer recorded), or {}."""
        return self._pointer()

    def read_file(self, step: int, name: str) -> bytes:
        """One file of the checkpoint of ``step``."""
        return self.store.read_bytes(self._rel(self.dirname(step), name))

    def has_file(self, step: int, name: str) -> bool:
        """Whether the checkpoint of ``step`` has file ``name``."""
        return self.store.exists(self._rel(self.dirname(step), name))


def valid_checksums(files: Any) -> bool:
    """Whether ``files`` is a non-empty ``{name: {"size": int, "sha256": str}}``."""
    return isinstance(files, dict) and bool(files) and all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
        and isinstance(v.get("sha256"), str) for k, v in files.items())


__all__ = ["CheckpointStore", "Store", "describe_store_error", "storage_options",
           "store_errors", "valid_checksums"]
