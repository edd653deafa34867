"""Everything Ray: the driver, Ray Train wiring, the Jobs API client. The only package that imports ray.

Importing the package imports nothing heavy: ``kd_cluster.cluster.jobs_api`` needs only Ray's job submission
client (and only when it talks to a cluster); the driver (torch, Ray Train) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_DRIVER = ("JobResult", "StageFailed", "load_resolved_spec", "run_job", "run_root", "save_resolved_spec")


def __getattr__(name: str) -> Any:
    """The driver's names (and ``ensure_ray``), imported on first use."""
    if name == "ensure_ray":
        return importlib.import_module("kd_cluster.cluster.local_ray").ensure_ray
    if name in _DRIVER:
        return getattr(importlib.import_module("kd_cluster.cluster.driver"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["JobResult", "StageFailed", "ensure_ray", "load_resolved_spec", "run_job", "run_root", "save_resolved_spec"]
