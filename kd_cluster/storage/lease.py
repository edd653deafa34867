"""One writer per run: a lease file in the run's storage folder.

``kd-cluster run`` and ``resume`` take the lease of the run folder before they write anything and give it
back when they end. The lease (``lease.json``) names its owner (a random id), the host, the process id, the
Ray job id when the driver runs as a Ray job, and a heartbeat that a background thread refreshes every
``timeout_s / 4`` seconds. A second ``run``/``resume`` of a live run is refused with a one-line error naming
the owner. A driver that was killed or preempted leaves its lease behind with a heartbeat that stops
moving; once the heartbeat is older than ``timeout_s``, ``--force`` takes the lease over. A lease left by a
process of this same machine (same boot and process namespace, Linux) that no longer exists is taken over
at once, without ``--force``: ``kill -9`` then the same command again is the common case on a laptop.

What the guarantee rests on:

- local folders (and shared file systems with POSIX semantics): the lease is written to a temporary file
  and hard-linked to ``lease.json``; the link fails when the name exists, so of two drivers exactly one
  creates it. A takeover first renames the stale lease aside: only one of two racing takers can do that.
- S3 (s3fs): a conditional PUT (``If-None-Match: *``), which S3 and compatible stores that implement it
  refuse when the object exists, so again exactly one creator wins. Stores that ignore the condition
  fall back to the check below.
- any other store: write, wait a moment, read back and keep the lease only when it still names us. Two
  drivers starting within that moment of each other can both believe they won; the heartbeat thread reads
  the lease back at every refresh and logs an error when another owner has replaced it.

A takeover between a stale lease's check and its removal is not atomic on object stores: two drivers
forcing the same stale run in the same second may both proceed. ``--force`` is meant for a person who knows
the other driver is gone.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from kd_cluster.storage import Store

log = logging.getLogger(__name__)

LEASE = "lease.json"


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
        for _ in range(3):  # a lease released or replaced between our look and our create: look again
            other = self.current()
            if other is not None and other.machine is not None and other.machine == self.info.machine \
                    and other.pid != os.getpid() and _gone(other.pid):
                log.warning("run %r: taking over the lease of %s: that process no longer exists", self.run,
                            other.describe())
                self._remove_stale(other)
                other = None
            if other is not None:
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
                self._remove_stale(other)
            if self._create():
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
                cur = self.current()
                if cur is not None and cur.owner == self.info.owner:
                    self.store.remove(LEASE)
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
            tmp = f"{target}.{self.info.owner}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._payload())
                f.flush()
                os.fsync(f.fileno())
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
            fs.pipe_file(target, self._payload(), mode="create")  # s3fs: PUT with If-None-Match: *
        except TypeError:  # a store without conditional writes: write if absent, then read back below
            if self.current() is not None:
                return False
            self.store.write_bytes(LEASE, self._payload())
            time.sleep(min(1.0, self.heartbeat_s))
        except Exception as exc:  # noqa: BLE001 - a refused condition (412) surfaces as various errors
            log.debug("conditional lease create refused: %s", exc)
        cur = self.current()
        return cur is not None and cur.owner == self.info.owner

    def _remove_stale(self, stale: LeaseInfo) -> None:
        if self.store.local:
            target = self.store._p(LEASE)
            aside = f"{target}.stale-{uuid.uuid4().hex[:8]}"
            try:  # only one of two takers can rename it aside
                os.rename(target, aside)
            except FileNotFoundError:
                return
            os.unlink(aside)
            return
        self.store.remove(LEASE)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                cur = self.current()
                if cur is not None and cur.owner != self.info.owner:
                    if self.lost is None:
                        log.error("run %r: the lease was taken over by %s; this driver no longer owns the run",
                                  self.run, cur.describe())
                    self.lost = cur
                    continue
                self.info.heartbeat = self.clock()
                self.store.write_bytes(LEASE, self._payload())
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat tries again
                log.warning("run %r: lease heartbeat failed (%s: %s)", self.run, type(exc).__name__, exc)


__all__ = ["LEASE", "LeaseHeld", "LeaseInfo", "RunLease"]
