"""What runs leave behind, and the commands that work on it.

The package's top level reads run folders on storage without torch or ray (:mod:`~kd_cluster.results.store`:
find a run, its progress, every run under a path, failed attempts, metric files). The commands that work on a
finished run's model are in submodules: :mod:`~kd_cluster.results.evaluate` (metrics on a split),
:mod:`~kd_cluster.results.export` (ONNX, TorchScript, safetensors with their metadata), and
:mod:`~kd_cluster.results.report` (one self-contained HTML page of runs' curves; no torch either).
"""

from kd_cluster.results.store import (FAILURE, RESOLVED_SPEC, STAGE_MARKER, RunNotFound, attempt, find_run,
                                      list_runs, metrics_path, read_job, record_failure, run_progress,
                                      spec_for_resume, stage_specs, write_file)

__all__ = ["FAILURE", "RESOLVED_SPEC", "STAGE_MARKER", "RunNotFound", "attempt", "find_run", "list_runs",
           "metrics_path", "read_job", "record_failure", "run_progress", "spec_for_resume", "stage_specs", "write_file"]
