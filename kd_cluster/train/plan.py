"""From a validated job spec to runnable stage plans, with every check that needs the registries or the data.

``plan_job`` raises :class:`~kd_cluster.config.SpecError` (file, field, what is allowed) before anything
is started. ``check_data``: "none" checks names only; "local" also opens local and builtin manifests
(``kd-cluster validate``); "all" also opens remote manifests (``kd-cluster run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from kd_cluster.config import JobSpec, SpecError, stage_spec, stages_of
from kd_cluster.data import DataError, Manifest, load_manifest
from kd_cluster.methods import MethodError, Needs, method_needs
from kd_cluster.models import ModelError, check_model_name, check_taps
from kd_cluster.storage import absolute, describe_store_error, is_remote, join, storage_options, store_errors

STAGE_REF = "stage:"
METHOD_ARTIFACT = "method.safetensors"


@dataclass
class StagePlan:
    """Everything one stage's workers need, resolved on the driver (absolute paths, step counts)."""

    run: str
    stage: str
    spec: JobSpec
    trains: str
    arch: str
    weights: str | None
    teacher_arch: str | None
    teacher_weights: str | None
    total_steps: int
    step_offset: int
    num_classes: int
    channels: int
    train_manifest: str
    val_manifest: str | None
    stage_url: str
    method_init: str | None = None
    """Weights for the method's own modules (``method.init``), resolved to an absolute URI."""

    @property
    def artifact_url(self) -> str:
        """Where the trained model of this stage is written (safetensors)."""
        return join(self.stage_url, "model.safetensors")

    @property
    def method_artifact_url(self) -> str:
        """Where the method's own trained modules (regressors, heads, banks) are written, when it has any."""
        return join(self.stage_url, METHOD_ARTIFACT)


def _manifest(url: str, endpoint: str | None, field: str, check: str, problems: list[str],
              opened: dict[tuple[str, str | None], Manifest | None]) -> Manifest | None:
    """Open a manifest once per planning call (stages usually share their data); report a failure once."""
    if check == "none" or (check == "local" and is_remote(url)):
        return None
    if (url, endpoint) not in opened:
        opened[url, endpoint] = _open_manifest(url, endpoint, field, problems)
    return opened[url, endpoint]


def _open_manifest(url: str, endpoint: str | None, field: str, problems: list[str]) -> Manifest | None:
    try:
        return load_manifest(absolute(url), storage_options(url, endpoint))
    except DataError as exc:
        problems.append(f"{field}: {exc}")
    except store_errors() as exc:  # fsspec/s3 errors: unreachable store, no credentials
        problems.append(f"{field}: cannot read manifest {url!r}: {describe_store_error(exc)}")
    return None


def _resolve_weights(weights: str | None, field: str, earlier: list[str], root: str,
                     problems: list[str], artifact: str = "model.safetensors") -> str | None:
    """A weights URI made absolute, or 'stage:<name>' turned into that earlier stage's artifact URL."""
    if weights is None or not weights.startswith(STAGE_REF):
        return absolute(weights) if weights else None
    ref = weights[len(STAGE_REF):]
    if ref not in earlier:
        problems.append(f"{field}: {weights!r} names no earlier stage; earlier stages: {', '.join(earlier) or '(none)'}")
        return None
    return join(root, ref, artifact)


def plan_job(spec: JobSpec, source: str, check_data: Literal["none", "local", "all"] = "all") -> list[StagePlan]:
    """Check a job against the registries and its data; return one plan per stage."""
    problems: list[str] = []
    stages = stages_of(spec)
    plans: list[StagePlan] = []
    trained_by: dict[str, str] = {}
    opened: dict[tuple[str, str | None], Manifest | None] = {}
    offset = 0
    root = join(absolute(spec.storage.path), spec.name)
    for i, stage in enumerate(stages):
        eff = stage_spec(spec, stage) if spec.stages else spec
        # workers run in other directories: local telemetry paths are fixed on the driver
        eff = eff.model_copy(update={"telemetry": eff.telemetry.model_copy(
            update={"wandb_dir": absolute(eff.telemetry.wandb_dir)})})
        at = f"stages[{i}] ({stage.name}): " if spec.stages else ""
        trained = eff.teacher if stage.trains == "teacher" else eff.student
        if trained is None:
            problems.append(f"{at}stage trains the teacher but the job has no 'teacher' section")
            continue
        known_arch = {}
        for field, model in (("student", eff.student), ("teacher", eff.teacher)):
            if model is None:
                continue
            try:
                check_model_name(model.arch)
                known_arch[field] = model.arch
            except ModelError as exc:
                problems.append(f"{at}{field}.arch: {exc}")
        needs: Needs | None
        try:
            needs = method_needs(eff.method.name, eff.method.params())
        except MethodError as exc:
            problems.append(f"{at}{exc}")
            needs = None
        if needs is not None and stage.trains == "student":
            for field, taps in (("student", needs.student_features), ("teacher", needs.teacher_features)):
                if taps and field in known_arch:
                    try:
                        check_taps(known_arch[field], taps)
                    except ModelError as exc:
                        problems.append(f"{at}method {eff.method.name!r}: {field} feature taps: {exc}")
        if needs is not None and needs.teacher and stage.trains == "teacher":
            problems.append(f"{at}method {eff.method.name!r} needs a teacher, but this stage trains the teacher; "
                            "use a method without one (e.g. supervised)")
        if needs is not None and needs.teacher and eff.teacher is None:
            problems.append(f"{at}method {eff.method.name!r} needs a teacher: add a 'teacher' section")

        teacher_needed = needs is not None and needs.teacher and stage.trains == "student"
        teacher_weights = (_resolve_weights(eff.teacher.weights, f"{at}teacher.weights", list(trained_by), root, problems)
                           if teacher_needed and eff.teacher else None)
        if teacher_needed and eff.teacher is not None and eff.teacher.weights is None:
            problems.append(f"{at}teacher.weights: a frozen teacher needs weights (a URI, or 'stage:<name>' "
                            "of a stage that trains it)")
        own_output = trained.weights == f"{STAGE_REF}{stage.name}"  # the model this stage produces: start fresh
        weights = None if own_output else _resolve_weights(
            trained.weights, f"{at}{stage.trains}.weights", list(trained_by), root, problems)

        init = eff.method.params().get("init")
        method_init = (_resolve_weights(init, f"{at}method.init", list(trained_by), root, problems, METHOD_ARTIFACT)
                       if isinstance(init, str) else None)

        train_m = _manifest(eff.data.train, eff.data.endpoint_url, f"{at}data.train", check_data, problems, opened)
        val_m = (_manifest(eff.data.val, eff.data.endpoint_url, f"{at}data.val", check_data, problems, opened)
                 if eff.data.val else None)
        if train_m is not None:
            splits = eff.resources.num_workers * max(1, eff.data.loader_workers)
            if len(train_m.shards) < splits:
                problems.append(f"{at}data.train: {len(train_m.shards)} shards cannot feed {splits} streams "
                                f"(resources.num_workers x data.loader_workers); write at least {splits} shards")
            if val_m is not None and val_m.classes != train_m.classes:
                problems.append(f"{at}data.val: its classes differ from data.train's")
        if eff.schedule.steps is not None:
            total = eff.schedule.steps
        elif train_m is not None:
            total = max(1, math.ceil(eff.schedule.epochs * train_m.num_samples / eff.data.batch_size))
        else:
            total = 0  # epochs of data not opened: known at run time
        plans.append(StagePlan(
            run=spec.name, stage=stage.name, spec=eff, trains=stage.trains, arch=trained.arch,
            weights=weights, teacher_arch=eff.teacher.arch if teacher_needed and eff.teacher else None,
            teacher_weights=teacher_weights, total_steps=total, step_offset=offset,
            num_classes=train_m.num_classes if train_m else 0, channels=train_m.channels if train_m else 0,
            # opened manifests are passed by their resolved URL (a builtin set is built on the driver)
            train_manifest=train_m.url if train_m else absolute(eff.data.train),
            val_manifest=(val_m.url if val_m else absolute(eff.data.val)) if eff.data.val else None,
            stage_url=join(root, stage.name), method_init=method_init,
        ))
        trained_by[stage.name] = stage.trains
        offset += total
    if problems:
        raise SpecError(source, problems)
    return plans


__all__ = ["METHOD_ARTIFACT", "STAGE_REF", "StagePlan", "plan_job"]
