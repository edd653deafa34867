"""Preemption: a flag raised by SIGTERM (or a runtime's preemption notice) that the loop acts on.

Spot reclaims and Kubernetes pod deletion send SIGTERM, then SIGKILL after a grace period. The loop
checks the flag every ``fault_tolerance.check_every`` steps (all ranks agree through one tiny
all-reduce), writes a checkpoint, waits for its upload within ``preemption_grace_s`` and raises
:class:`Preempted`. Under Ray Train that is a worker failure: ``FailureConfig.max_failures`` restarts the
workers, which resume from that checkpoint. In one process the CLI exits with 143 (128 + SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class Preempted(RuntimeError):
    """The run stopped on a preemption after writing a checkpoint at ``step``."""

    def __init__(self, stage: str, step: int, reason: str, saved: bool) -> None:
        self.stage, self.step, self.reason, self.saved = stage, step, reason, saved
        what = (f"checkpoint of step {step} written; re-run the same job (or `kd-cluster resume`) to continue"
                if saved else f"the checkpoint of step {step} could not be written in the grace period; "
                "a resume starts from the previous checkpoint")
        super().__init__(f"stage {stage!r} preempted ({reason}) at step {step}: {what}")


class PreemptionFlag:
    """Set once by a signal handler or a poll; ``saved`` is set when the loop's checkpoint is durable."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self.saved = threading.Event()
        self.reason = ""
        self.poll: Callable[[], str | None] | None = None
        """Optional runtime check (e.g. Ray's node-preemption notice), called at check steps on every rank."""

    def request(self, reason: str) -> None:
        """Ask the loop to checkpoint and stop."""
        if not self._requested.is_set():
            self.reason = reason
            self._requested.set()

    def requested(self) -> bool:
        """Whether a stop was asked for (runs the poll, if any: call it on every rank at the same steps)."""
        if not self._requested.is_set() and self.poll is not None:
            reason = self.poll()
            if reason:
                self.request(reason)
        return self._requested.is_set()

    def install_sigterm(self) -> bool:
        """Handle SIGTERM by raising the flag (main thread only; returns whether it was installed)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGTERM, lambda signum, frame: self.request("SIGTERM"))
        return True


__all__ = ["Preempted", "PreemptionFlag"]
