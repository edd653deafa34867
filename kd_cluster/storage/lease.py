"""One writer per run: a lease file in the run's storage folder.

``kd-cluster run`` and ``resume`` take the lease of the run folder before they write anything and give it
back when they end. The lease (``lease.json``) names its owner (a random id), the host, the process id, the
Ray job id when the driver runs as a Ray job, and a heartbeat that a background thread refreshes every
``timeout_s / 4`` seconds. A second ``run``/``resume`` of a live run is refused with a one-line error naming
the owner. A driver that was killed or preempted leaves its lease behind with a heartbeat that stops
moving; once the heartbeat is older than ``timeout_s``, ``--force`` takes the lease over. A lease left by a
process of this same machine (same boot and process namespace, Linux) that no longer exists is taken over
at once, without ``--force``: ``kill -9`` then the same command again is the common case on a laptop.

What the guarantee rests on. Every change of the lease after its creation (a heartbeat, a takeover, the
release) is a compare-and-swap against the lease the writer last saw, so a takeover that lands between a
heartbeat's look and its write is never overwritten: the deposed driver's next heartbeat fails its condition,
sets :attr:`RunLease.lost` and logs one line naming the new owner.

- local folders (and shared file systems with POSIX semantics): the lease is written to a temporary file
  and hard-linked to ``lease.json``; the link fails when the name exists, so of two drivers exactly one
  creates it. Heartbeats, takeovers and the release look and write under an exclusive ``flock`` of the run
  folder, so a look and its write are one step.
- S3 (s3fs): the create is a conditional PUT (``If-None-Match: *``); a heartbeat or takeover is a PUT with
  ``If-Match`` on the ETag of the lease it replaces, the release a DELETE with ``If-Match``. Stores that
  ignore the conditions fall back to the weaker check below.
- any other store: write, wait a moment, read back and keep the lease only when it still names us. Two
  drivers starting within that moment of each other can both believe they won; the heartbeat thread reads
  the lease back at every refresh and logs an error when another owner has replaced it.

The lease fences the lease itself. Checkpoint commits are not yet conditional on it: a deposed driver that
has not yet run its next heartbeat can still commit one checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from kd_cluster.storage import Store

log = logging.getLogger(__name__)

LEASE = "lease.json"

FENCED = True
"""Heartbeats as compare-and-swap writes. Only a test turns this off, to show that its race is real: unfenced,
a heartbeat looks, then writes, and overwrites a takeover that landed in between."""


class LeaseHeld(Exception):
    """The run is (or may still be) written by another driver; the message names it and how to take over."""


@dataclass
class LeaseInfo:
    """What a lease file holds."""

    owner: str
    host: str
    pid: int
    ray_job: str | None
    started: float
    heartbeat: float
    machine: str | None = None
    """This boot of this machine and its process namespace (Linux), where ``pid`` means something."""

    def describe(self) -> str:
        where = f"pid {self.pid} on {self.host}" + (f", Ray job {self.ray_job}" if self.ray_job else "")
        return f"owner {self.owner} ({where})"


def _machine() -> str | None:
    """An id of this boot of this machine and this process namespace (None where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _gone(pid: int) -> bool:
    """Whether process ``pid`` of this machine has ended (a zombie has ended too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _refused(exc: OSError) -> bool:
    """Whether an s3fs error is S3's 412 answer to a write whose condition (If-Match) no longer holds."""
    text = str(exc).lower()
    return exc.errno == errno.EINVAL and ("pre-condition" in text or "precondition" in text)


def _ray_job_id() -> str | None:
    """The Ray job this driver runs as, when started by the Ray Jobs API."""
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or None


class RunLease:
    """The lease of one run folder; use as a context manager around everything that writes the run."""

    def __init__(self, store: Store, *, timeout_s: float, run: str = "", heartbeat_s: float | None = None,
                 clock: Any = time.time) -> None:
        self.store, self.timeout_s, self.run = store, timeout_s, run or store.root
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.2, min(30.0, timeout_s / 4))
        self.clock = clock
        now = clock()
        self.info = LeaseInfo(owner=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(),
                              ray_job=_ray_job_id(), started=now, heartbeat=now, machine=_machine())
        self.lost: LeaseInfo | None = None
        """The owner that replaced this lease while it was held (set by the heartbeat thread)."""
        self._etag: str | None = None
        """S3: the ETag of the lease as this driver last wrote it (the condition of its next write)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self._made: list[str] = []
        """Local folders the lease's create made (deepest first): removed again at release while still empty, so
        a run refused before it wrote anything (a missing dataset, say) leaves no folder behind."""

    # -- reading -----------------------------------------------------------------------------------------------

    def current(self) -> LeaseInfo | None:
        """The lease in the folder now (None when there is none; an unreadable one counts as long stale)."""
        try:
            if not self.store.exists(LEASE):
                return None
            raw = json.loads(self.store.read_bytes(LEASE))
            return LeaseInfo(**{k: raw[k] for k in LeaseInfo.__dataclass_fields__ if k in raw})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return LeaseInfo(owner="unknown", host="?", pid=0, ray_job=None, started=0.0, heartbeat=0.0)

    # -- taking and giving back --------------------------------------------------------------------------------

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise :class:`LeaseHeld`. ``force`` takes over a lease whose heartbeat is older
        than ``timeout_s``; a live one is never taken."""
        for _ in range(3):  # a lease released or replaced between our look and our write: look again
            other, token = self._read()
            if other is not None and other.machine is not None and other.machine == self.info.machine \
                    and other.pid != os.getpid() and _gone(other.pid):
                log.warning("run %r: taking over the lease of %s: that process no longer exists", self.run,
                            other.describe())
            elif other is not None:
                age = self.clock() - other.heartbeat
                if not force:
                    raise LeaseHeld(
                        f"run {self.run!r} is being written by {other.describe()}, last heartbeat {age:.0f} s ago; "
                        f"if that driver is gone, wait until its heartbeat is older than "
                        f"fault_tolerance.lease_timeout_s ({self.timeout_s:g} s) and add --force to take over")
                if age < self.timeout_s:
                    raise LeaseHeld(
                        f"run {self.run!r}: --force takes over only a lease whose heartbeat is older than "
                        f"fault_tolerance.lease_timeout_s ({self.timeout_s:g} s); {other.describe()} beat "
                        f"{age:.0f} s ago: it may still be running")
                log.warning("run %r: taking over the lease of %s (heartbeat %.0f s old)", self.run,
                            other.describe(), age)
            ours = self._create() if other is None else self._swap(other, token)
            if ours:
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
                self._thread.start()
                return
        raise LeaseHeld(f"run {self.run!r}: another driver took the lease at the same moment ({self.current()})")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.held:
            self.held = False
            try:
                self._remove_own()
            except OSError as exc:  # the run's outcome does not depend on it: a stale lease can be forced
                log.warning("run %r: could not remove its lease (%s)", self.run, exc)
        for folder in self._made:  # deepest first; a folder the run wrote into is not empty and stays
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._made = []

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------------------------

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.info), sort_keys=True).encode()

    def _create(self) -> bool:
        """Create the lease if no lease exists; True when it is ours."""
        target = self.store._p(LEASE)
        fs = self.store.fs
        if self.store.local and not self._made:
            folder = os.path.dirname(os.path.abspath(target))
            while folder and not os.path.isdir(folder) and folder != os.path.dirname(folder):
                self._made.append(folder)
                folder = os.path.dirname(folder)
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.store.local:
            tmp = self._staged()
            try:
                os.link(tmp, target)  # atomic create-if-absent, of a complete file
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: an exclusive create, then the content
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(self._payload())
                return True
            finally:
                os.unlink(tmp)
        try:
            out = fs.pipe_file(target, self._payload(), mode="create")  # s3fs: PUT with If-None-Match: *
            self._etag = out.get("ETag") if isinstance(out, dict) else None
        except TypeError:  # a store without conditional writes: write if absent, then read back below
            if self.current() is not None:
                return False
            self.store.write_bytes(LEASE, self._payload())
            time.sleep(min(1.0, self.heartbeat_s))
        except Exception as exc:  # noqa: BLE001 - a refused condition (412) surfaces as various errors
            log.debug("conditional lease create refused: %s", exc)
        cur = self.current()
        return cur is not None and cur.owner == self.info.owner

    @property
    def _s3(self) -> bool:
        return type(self.store.fs).__name__ == "S3FileSystem"

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """An exclusive flock of the run folder (local stores): a look at the lease and the write that
        follows it happen as one step for every driver that takes this lock."""
        fd = os.open(os.path.dirname(os.path.abspath(self.store._p(LEASE))), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _bucket_key(self) -> tuple[str, str]:
        bucket, key, _ = self.store.fs.split_path(self.store._p(LEASE))
        return bucket, key

    def _read(self) -> tuple[LeaseInfo | None, str | None]:
        """The lease now and the token a conditional write against it needs (the ETag on S3). The ETag is read
        before the content: were the lease replaced in between, a write against that ETag fails, never the
        other way round."""
        if not self._s3:
            return self.current(), None
        bucket, key = self._bucket_key()
        try:
            etag = self.store.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        except FileNotFoundError:
            return None, None
        return self.current(), etag

    def _staged(self) -> str:
        """Our lease, complete and on disk, in a temporary file beside ``lease.json`` (local stores)."""
        tmp = f"{self.store._p(LEASE)}.{self.info.owner}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._payload())
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _write_local(self) -> None:
        os.replace(self._staged(), self.store._p(LEASE))

    def _put_if_match(self, etag: str | None) -> bool:
        """S3: replace the lease with ours if it is still the one with ``etag``; False when it is not."""
        if etag is None:
            return False
        try:
            out = self.store.fs.pipe_file(self.store._p(LEASE), self._payload(), IfMatch=etag)
        except (FileNotFoundError, FileExistsError):
            return False
        except OSError as exc:
            if _refused(exc):
                return False
            raise
        self._etag = out.get("ETag") if isinstance(out, dict) else None
        return True

    def _swap(self, seen: LeaseInfo, token: str | None) -> bool:
        """Take over the lease ``seen`` (read with ``token``) if it is still that lease; True when it is ours."""
        if self.store.local:
            with self._folder_lock():
                cur = self.current()
                if cur is None or (cur.owner, cur.heartbeat) != (seen.owner, seen.heartbeat):
                    return False  # it beat or was taken meanwhile: look again
                self._write_local()
                return True
        if self._s3:
            return self._put_if_match(token)
        self.store.remove(LEASE)  # other stores: remove and create, read back (see the module's note)
        return self._create()

    def _remove_own(self) -> None:
        if self.store.local:
            with self._folder_lock():
                cur = self.current()
                if cur is not None and cur.owner == self.info.owner:
                    self.store.remove(LEASE)
            return
        if self._s3 and self._etag is not None:
            bucket, key = self._bucket_key()
            try:
                self.store.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
            except (FileNotFoundError, FileExistsError):
                pass
            except OSError as exc:
                if not _refused(exc):
                    raise
            self.store.fs.invalidate_cache(self.store._p(LEASE))
            return
        cur = self.current()
        if cur is not None and cur.owner == self.info.owner:
            self.store.remove(LEASE)

    def _beat_once(self) -> None:
        """Refresh the heartbeat if the lease is still ours; otherwise record who holds it in :attr:`lost`."""
        self.info.heartbeat = self.clock()
        if FENCED and self.store.local:
            with self._folder_lock():
                cur = self.current()
                if cur is not None and cur.owner == self.info.owner:
                    self._write_local()
                    return
        elif FENCED and self._s3:
            if self._put_if_match(self._etag):
                return
            cur, etag = self._read()
            if cur is not None and cur.owner == self.info.owner:  # our own last write whose answer was lost
                self._etag = etag
                return
        else:  # other stores: look, then write (the weaker guarantee the module's note describes)
            cur = self.current()
            if cur is not None and cur.owner == self.info.owner:
                self.store.write_bytes(LEASE, self._payload())
                return
        taken = cur or LeaseInfo(owner="nobody (the lease was removed)", host="?", pid=0, ray_job=None,
                                 started=0.0, heartbeat=0.0)
        if self.lost is None:
            log.error("run %r: the lease was taken over by %s; this driver no longer owns the run", self.run,
                      taken.describe())
        self.lost = taken

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.lost is not None:
                return  # a deposed driver writes nothing more to the lease
            try:
                self._beat_once()
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat tries again
                log.warning("run %r: lease heartbeat failed (%s: %s)", self.run, type(exc).__name__, exc)


__all__ = ["LEASE", "LeaseHeld", "LeaseInfo", "RunLease"]
