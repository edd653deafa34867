"""Job spec: typed config loaded from YAML. Imports neither torch nor ray."""

from kd_cluster.config.loader import (SpecError, apply_overrides, load_job, load_raw, merge,
                                      stage_spec, stages_of, validate_spec, with_settings)
from kd_cluster.config.spec import (AugmentSpec, DataSpec, FaultToleranceSpec, JobSpec, MethodSpec, ModelSpec, NormalizeSpec,
                                    OptimizerSpec, ResourcesSpec, ScheduleSpec, StageSpec, StorageSpec,
                                    ShampooSpec, TeacherSpec, TelemetrySpec)

__all__ = [
    "AugmentSpec", "DataSpec", "FaultToleranceSpec", "JobSpec", "MethodSpec", "ModelSpec", "NormalizeSpec", "OptimizerSpec",
    "ResourcesSpec", "ScheduleSpec", "ShampooSpec", "SpecError", "StageSpec", "StorageSpec", "TeacherSpec", "TelemetrySpec",
    "apply_overrides", "load_job", "load_raw", "merge", "stage_spec", "stages_of", "validate_spec", "with_settings",
]
