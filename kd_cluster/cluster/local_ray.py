"""Starting the local Ray instance of ``kd-cluster run`` (no address given), so that its runs stay quiet and do not
trip over other Ray instances on the same machine.

Two things Ray Train does on every run needed a setting here:

* Its placement-group cleaner (a detached actor of every Train run) asks the State API whether the run's
  controller is alive, with no address; Ray then looks for "the" local instance, and with two or more on the
  machine (two runs started at once, or anyone else's) it raises "Found multiple active Ray instances" in
  the cleaner's thread, which prints a traceback into the run's output and leaves the cleaner dead. Ray
  resolves the State API's address from ``RAY_API_SERVER_ADDRESS`` first, so the instance is started with
  its dashboard (which serves the State API) on a port chosen here, and that variable is set before Ray
  starts: the raylet, and every worker and actor it starts, inherit it.
* Its ``PreemptionWatcher`` actor (restartable, with the workers' handles as constructor arguments) makes
  Ray's core worker log an error-level line at every stage ("has constructor arguments in the object store
  and max_restarts > 0", ray-project/ray#53727). The watcher reports node drains (spot reclaims announced by
  the autoscaler); one machine's own instance has no node that is drained, so it is not started there
  (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``, unless set by the user). On a cluster it keeps running:
  it is what turns a drain into :func:`ray.train.get_preemption_info`, which our workers poll.
"""

from __future__ import annotations

import os
import socket
from typing import Any

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_local_ray(num_cpus: int | None, **init_kwargs: Any) -> Any:
    """``ray.init`` of a new Ray instance on this machine, owned by this process; returns Ray's context.

    The dashboard (State API, Jobs API) listens on 127.0.0.1 only."""
    import ray

    os.environ.setdefault(WATCHER_ENV, "0")
    kwargs: dict[str, Any] = {"num_cpus": num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                              "log_to_driver": True, "configure_logging": True, "logging_level": "WARNING",
                              **init_kwargs}
    for attempt in range(_ATTEMPTS):
        port = _free_port()
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        try:
            return ray.init(dashboard_port=port, **kwargs)
        except ValueError as exc:  # another process took the port between our probe and Ray's bind
            if "already occupied" not in str(exc) or attempt == _ATTEMPTS - 1:
                raise
            ray.shutdown()
    raise AssertionError("unreachable")


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local one sized for the job."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # An existing cluster's workers use the cluster's own credentials (Kubernetes Secrets, instance roles);
        # `kd-cluster submit` is the path that forwards the submitter's by name.
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(num_cpus)


__all__ = ["API_SERVER_ENV", "WATCHER_ENV", "ensure_ray", "start_local_ray"]
