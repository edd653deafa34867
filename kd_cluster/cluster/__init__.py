"""Everything Ray: the driver, Ray Train wiring. The only package that imports ray."""

from kd_cluster.cluster.driver import JobResult, StageFailed, ensure_ray, run_job

__all__ = ["JobResult", "StageFailed", "ensure_ray", "run_job"]
