"""Everything Ray: the driver, Ray Train wiring. The only package that imports ray."""

from kd_cluster.cluster.driver import (JobResult, StageFailed, ensure_ray, load_resolved_spec, run_job, run_root,
                                       save_resolved_spec)

__all__ = ["JobResult", "StageFailed", "ensure_ray", "load_resolved_spec", "run_job", "run_root", "save_resolved_spec"]
