"""From a validated job spec to runnable stage plans, with every check that needs the registries or the data.

``plan_job`` raises :class:`~kd_cluster.config.SpecError` (file, field, what is allowed) before anything
is started. ``check_data``: "none" checks names only; "local" also opens local and builtin manifests
(``kd-cluster validate``); "all" also opens remote manifests (``kd-cluster run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from kd_cluster.config import JobSpec, SpecError, stage_spec, stages_of, with_settings
from kd_cluster.config.spec import LabelStageSpec, ModelSpec, StageSpec, TeacherSpec
from kd_cluster.data import DataError, DatasetMissing, Manifest, load_manifest, read_labels
from kd_cluster.data.catalog import check_builtin, is_builtin
from kd_cluster.data.soft_labels import label_mismatches
from kd_cluster.methods import MethodError, Needs, method_needs
from kd_cluster.models import ModelError, check_model_name, check_taps, default_normalization, weights_sha256
from kd_cluster.storage import describe_store_error, storage_options, store_errors
from kd_cluster.urls import absolute, is_remote, join
from kd_cluster.teacher import MemberPlan, TeacherPlan

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
    needs: Needs
    """What the stage's method needs from the loop, computed once here."""
    teacher: TeacherPlan | None
    """The stage's frozen teacher (None when the method needs none)."""
    total_steps: int
    step_offset: int
    num_classes: int
    channels: int
    train_manifest: str
    val_manifest: str | None
    stage_url: str
    method_init: str | None = None
    """Weights for the method's own modules (``method.init``), resolved to an absolute URI."""
    labels: LabelStageSpec | None = None
    """A stage that stores the teacher's predictions instead of training (``trains`` is "labels")."""

    @property
    def labels_url(self) -> str:
        """Where a labelling stage stores its label set."""
        return join(self.stage_url, "labels")

    @property
    def teacher_arch(self) -> str | None:
        """The teacher's model name (ensembles: the members' names joined by '+'), for display."""
        return "+".join(m.arch for m in self.teacher.members) if self.teacher else None

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
    if check == "local" and is_builtin(url):
        check_builtin(url)  # a builtin set whose source files are missing stops here, without building anything
    if check == "none" or (check == "local" and is_remote(url)):
        return None
    if (url, endpoint) not in opened:
        opened[url, endpoint] = _open_manifest(url, endpoint, field, problems)
    return opened[url, endpoint]


def _open_manifest(url: str, endpoint: str | None, field: str, problems: list[str]) -> Manifest | None:
    try:
        return load_manifest(absolute(url), storage_options(url, endpoint))
    except DatasetMissing:
        raise  # one line naming what to install; every split of the set would repeat it
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


def _trained_model(eff: JobSpec, trains: str, member: str | None, at: str,
                   problems: list[str]) -> ModelSpec | None:
    """The model a stage trains: the student, the teacher, or one member of an ensemble teacher."""
    if trains == "student":
        if member is not None:
            problems.append(f"{at}member: only a stage with trains: teacher trains an ensemble member")
        return eff.student
    t = eff.teacher
    if t is None:
        problems.append(f"{at}stage trains the teacher but the job has no 'teacher' section")
        return None
    if not t.members:
        if member is not None:
            problems.append(f"{at}member: {member!r} names an ensemble member, but the teacher has no members")
        return ModelSpec(arch=t.arch, weights=t.weights)
    names = [m.key for m in t.members]
    if member not in names:
        problems.append(f"{at}member: a stage that trains an ensemble teacher names the member it trains "
                        f"(one of {names}), got {member!r}")
        return None
    m = t.members[names.index(member)]
    return ModelSpec(arch=m.arch, weights=m.weights)


def _archs(eff: JobSpec) -> list[tuple[str, str]]:
    """(field, model name) of every network the stage's spec names."""
    out = [("student", eff.student.arch)]
    if eff.teacher is not None:
        out += ([(f"teacher.members[{j}]", m.arch) for j, m in enumerate(eff.teacher.members)]
                if eff.teacher.members else [("teacher", eff.teacher.arch)])
    return out


def _check_taps(eff: JobSpec, needs: Needs, at: str, problems: list[str]) -> None:
    """Feature taps exist in the networks they are read from (an ensemble's: its features_from member)."""
    checks = [("student", eff.student.arch, needs.student_features)]
    t = eff.teacher
    if t is not None and needs.teacher_features:
        if t.members and t.features_from is None:
            problems.append(f"{at}method {eff.method.name!r} reads teacher features: with an ensemble teacher, set "
                            f"teacher.features_from to the member whose features it gets (one of "
                            f"{[m.key for m in t.members]})")
        elif t.members:
            checks.append((f"teacher member {t.features_from!r}",
                           next(m.arch for m in t.members if m.key == t.features_from), needs.teacher_features))
        else:
            checks.append(("teacher", t.arch, needs.teacher_features))
    for field, arch, taps in checks:
        if not taps:
            continue
        try:
            check_model_name(arch)
        except ModelError:
            continue  # reported with the model names
        try:
            check_taps(arch, taps)
        except ModelError as exc:
            problems.append(f"{at}method {eff.method.name!r}: {field} feature taps: {exc}")


def _members(t: TeacherSpec, needs: Needs, at: str, earlier: list[str], root: str,
             problems: list[str]) -> list[MemberPlan]:
    """The teacher's networks with resolved weights and the taps each serves."""
    specs = t.members or [None]
    out = []
    for j, m in enumerate(specs):
        arch, weights = (m.arch, m.weights) if m is not None else (t.arch, t.weights)
        field = f"teacher.members[{j}].weights" if m is not None else "teacher.weights"
        if weights is None and t.placement != "stored":  # stored labels carry the teacher's predictions
            problems.append(f"{at}{field}: a frozen teacher needs weights (a URI, or 'stage:<name>' "
                            "of a stage that trains it)")
        resolved = _resolve_weights(weights, f"{at}{field}", earlier, root, problems)
        name = m.key if m is not None else "teacher"
        taps = tuple(needs.teacher_features) if (m is None or name == t.features_from) else ()
        out.append(MemberPlan(
            name=name, arch=arch, weights=resolved, weight=m.weight if m is not None else 1.0, taps=taps,
            replicas=(m.replicas if m is not None and m.replicas is not None else t.replicas),
            num_gpus=(m.num_gpus if m is not None and m.num_gpus is not None else t.num_gpus),
            num_cpus=(m.num_cpus if m is not None and m.num_cpus is not None else t.num_cpus),
            resource=(m.resource if m is not None and m.resource is not None else t.resource)))
    return out


def _teacher_plan(eff: JobSpec, needs: Needs, members: list[MemberPlan], num_classes: int, channels: int,
                  labels: str | None = None, expect: dict[str, Any] | None = None,
                  placement: str | None = None) -> TeacherPlan:
    t = eff.teacher
    assert t is not None
    norm = eff.data.normalize
    mean, std = (norm.mean, norm.std) if norm else default_normalization(channels)
    placement = placement or t.placement
    if placement == "stored":  # the labels hold the (ensemble's) output: one teacher, whatever its members
        members = [MemberPlan(name="teacher", arch="+".join(m.arch for m in members), weights=None)]
    return TeacherPlan(
        placement=placement, members=tuple(members), view=needs.teacher_view, num_classes=num_classes,
        channels=channels, mean=tuple(mean), std=tuple(std), endpoint_url=eff.storage.endpoint_url,
        method_name=eff.method.name, method_params=eff.method.params(), amp=eff.resources.amp,
        channels_last=eff.resources.channels_last, compile=eff.resources.compile, prefetch=t.prefetch, max_in_flight=t.max_in_flight,
        request_timeout_s=t.request_timeout_s, max_retries=t.max_retries, max_restarts=t.max_restarts,
        labels=labels, label_expect=expect or {}, seed=eff.seed)


def _check_stored(eff: JobSpec, needs: Needs, at: str, problems: list[str]) -> None:
    """What stored labels can serve: the teacher's top-N on unmixed crops fixed in advance, no features."""
    name = eff.method.name
    use = "use teacher.placement colocated or actors"
    if needs.live_teacher:
        problems.append(f"{at}teacher.placement: stored cannot serve method {name!r}: {needs.live_teacher}; {use}")
    if needs.teacher_features:
        problems.append(f"{at}teacher.placement: stored labels hold the teacher's top-N probabilities, not the "
                        f"features method {name!r} reads ({', '.join(needs.teacher_features)}); {use}")
    if needs.teacher_view == "same" and eff.augment.mixup_alpha > 0 and not needs.live_teacher:
        problems.append(f"{at}augment.mixup_alpha: method {name!r} wants the teacher's prediction on the mixed "
                        "image, but stored labels are predictions on unmixed crops: set augment.mixup_alpha: 0, or "
                        "use fixed_teacher (it mixes the stored targets as probabilities)")


def _label_expect(eff: JobSpec, members: list[MemberPlan], train_m: Manifest | None) -> dict[str, Any]:
    """What the stage expects of the label set it replays (checked here when the labels exist, and when the
    stored teacher opens them)."""
    t = eff.teacher
    assert t is not None
    a = eff.augment
    return {"archs": [m.arch for m in members], "arch_field": "teacher.members" if t.members else "teacher.arch",
            "weights": [m.weights for m in members], "image_size": eff.data.image_size,
            "crop_scale": list(a.crop_scale), "crop_ratio": list(a.crop_ratio), "flip": a.flip,
            "data_shards": [s.count for s in train_m.shards] if train_m is not None else None,
            "num_classes": train_m.num_classes if train_m is not None else 0,
            "channels": train_m.channels if train_m is not None else 0}


def check_form(name: str, needs: Needs, form: str, at: str, problems: list[str]) -> None:
    """Whether a label set of ``form`` (``topk`` or ``logits``) can serve the method."""
    if needs.full_logits and form != "logits":
        problems.append(f"{at}teacher.placement: stored top-N probabilities cannot serve method {name!r}: "
                        f"{needs.full_logits}; label with `kd-cluster teacher label --logits` (a labelling stage: "
                        "logits: true), or use teacher.placement colocated or actors")


def _check_labels(eff: JobSpec, at: str, check_data: str, labels: str, expect: dict[str, Any],
                  problems: list[str], needs: Needs) -> None:
    """A stored label set matches this job: the same teacher, data, image size and augmentation. Labels an
    earlier stage of this job will store are checked when the stage that replays them opens them."""
    if check_data == "none" or (check_data == "local" and is_remote(labels)):
        return
    opts = storage_options(labels, eff.storage.endpoint_url)
    try:
        cfg = read_labels(labels, opts).config
    except DataError as exc:
        if eff.teacher is not None and (eff.teacher.labels or "").startswith(STAGE_REF):
            return  # not stored yet: its stage runs first
        problems.append(f"{at}teacher.labels: {exc}")
        return
    except store_errors() as exc:
        problems.append(f"{at}teacher.labels: cannot read {labels!r}: {describe_store_error(exc)}")
        return
    shas = [weights_sha256(w, storage_options=storage_options(w, eff.storage.endpoint_url)) if w else None
            for w in expect["weights"]]
    problems.extend(at + line for line in label_mismatches(cfg, {**expect, "weights_sha256": shas}, eff.teacher.labels))
    check_form(eff.method.name, needs, cfg.form, at, problems)


def _stage_data(eff: JobSpec, at: str, check_data: str, problems: list[str],
                opened: dict[tuple[str, str | None], Manifest | None]) -> tuple[Manifest | None, Manifest | None, int]:
    """The stage's train and val manifests (when opened) and its step count."""
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
    return train_m, val_m, total


def _method_needs(eff: JobSpec, trains: str, at: str, problems: list[str]) -> Needs | None:
    """The stage method's needs (None when its name or settings are wrong), checked against the stage."""
    try:
        needs = method_needs(eff.method.name, eff.method.params())
    except MethodError as exc:
        problems.append(f"{at}{exc}")
        return None
    if trains == "student":
        _check_taps(eff, needs, at, problems)
    if needs.teacher and trains == "teacher":
        problems.append(f"{at}method {eff.method.name!r} needs a teacher, but this stage trains the teacher; "
                        "use a method without one (e.g. supervised)")
    if needs.teacher and eff.teacher is None:
        problems.append(f"{at}method {eff.method.name!r} needs a teacher: add a 'teacher' section")
    return needs


def _label_stage(spec: JobSpec, eff: JobSpec, stage: StageSpec, at: str, root: str, offset: int,
                 earlier: list[str], check_data: str, problems: list[str],
                 opened: dict[tuple[str, str | None], Manifest | None]) -> StagePlan | None:
    """A stage that stores the teacher's predictions on K views of every training sample (it trains nothing)."""
    assert stage.labels is not None
    if eff.teacher is None:
        problems.append(f"{at}labels: a stage that stores the teacher's predictions needs a 'teacher' section")
        return None
    for field, arch in _archs(eff)[1:]:
        try:
            check_model_name(arch)
        except ModelError as exc:
            problems.append(f"{at}{field}.arch: {exc}")
    needs = Needs(teacher=True)
    colocated = with_settings(eff, {"teacher": {"placement": "colocated", "labels": None}, "data": {"val": None}})
    members = _members(colocated.teacher, needs, at, earlier, root, problems)
    train_m, _, _ = _stage_data(colocated, at, check_data, problems, opened)
    num_classes, channels = (train_m.num_classes, train_m.channels) if train_m else (0, 0)
    if train_m is not None and stage.labels.top_k > num_classes:
        problems.append(f"{at}labels.top_k: {stage.labels.top_k} is more than the {num_classes} classes of the data")
    return StagePlan(run=spec.name, stage=stage.name, spec=eff, trains="labels", arch="+".join(m.arch for m in members),
                     weights=None, needs=needs,
                     teacher=_teacher_plan(eff, needs, members, num_classes, channels, placement="colocated"),
                     total_steps=0, step_offset=offset, num_classes=num_classes, channels=channels,
                     train_manifest=train_m.url if train_m else absolute(eff.data.train), val_manifest=None,
                     stage_url=join(root, stage.name), labels=stage.labels)


def _stored_labels(eff: JobSpec, at: str, trained_by: dict[str, str], root: str, problems: list[str],
                   stages: list[StageSpec], needs: Needs) -> str | None:
    """The label set a stored teacher replays: a URL, or an earlier labelling stage's output (whose form is
    checked against the method here; a URL's when it is opened)."""
    t = eff.teacher
    if t is None or t.placement != "stored" or not t.labels:
        return None
    if not t.labels.startswith(STAGE_REF):
        return absolute(t.labels)
    ref = t.labels[len(STAGE_REF):]
    if trained_by.get(ref) != "labels":
        labelled = [n for n, kind in trained_by.items() if kind == "labels"]
        problems.append(f"{at}teacher.labels: {t.labels!r} names no earlier stage that stores labels; such stages: "
                        f"{', '.join(labelled) or '(none)'}")
        return None
    spec = next(s.labels for s in stages if s.name == ref)
    assert spec is not None
    check_form(eff.method.name, needs, "logits" if spec.logits else "topk", at, problems)
    return join(root, ref, "labels")


def check_here(plans: list[StagePlan], source: str) -> None:
    """Rules that depend on the machine the stages train on, for a job that trains on this one (``validate``,
    ``run`` without a cluster address): ``data.decode: gpu`` needs CUDA and nvImageCodec here."""
    gpu = [p.stage for p in plans if p.spec.data.decode == "gpu"]
    if not gpu:
        return
    from kd_cluster.data.gpu_decode import cuda_problem  # torch: only for a job that decodes on the GPU

    problem = cuda_problem()
    if problem:
        where = "" if len(gpu) == len(plans) else f" (stages {', '.join(gpu)})"
        raise SpecError(source, [problem + where])


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
        eff = with_settings(eff, {"telemetry": {"wandb_dir": absolute(eff.telemetry.wandb_dir)}})
        at = f"stages[{i}] ({stage.name}): " if spec.stages else ""
        if stage.labels is not None:
            label_plan = _label_stage(spec, eff, stage, at, root, offset, list(trained_by), check_data, problems,
                                      opened)
            trained_by[stage.name] = "labels"
            if label_plan is not None:
                plans.append(label_plan)
            continue
        trained = _trained_model(eff, stage.trains, stage.member, at, problems)
        if trained is None:
            continue
        for field, arch in _archs(eff):
            try:
                check_model_name(arch)
            except ModelError as exc:
                problems.append(f"{at}{field}.arch: {exc}")
        needs = _method_needs(eff, stage.trains, at, problems)
        teacher_needed = needs is not None and needs.teacher and stage.trains == "student"
        members = (_members(eff.teacher, needs, at, list(trained_by), root, problems)
                   if teacher_needed and eff.teacher is not None and needs is not None else None)
        if members and eff.teacher is not None and eff.teacher.placement == "stored":
            _check_stored(eff, needs, at, problems)
        own_output = trained.weights == f"{STAGE_REF}{stage.name}"  # the model this stage produces: start fresh
        weights = None if own_output else _resolve_weights(
            trained.weights, f"{at}{stage.trains}.weights", list(trained_by), root, problems)

        init = eff.method.params().get("init")
        method_init = (_resolve_weights(init, f"{at}method.init", list(trained_by), root, problems, METHOD_ARTIFACT)
                       if isinstance(init, str) else None)

        if eff.data.decode == "gpu" and not eff.resources.use_gpu:
            problems.append(f"{at}data.decode: 'gpu' decodes on the training workers' GPUs; set resources.use_gpu: "
                            "true (or data.decode: cpu)")
        train_m, val_m, total = _stage_data(eff, at, check_data, problems, opened)
        labels = _stored_labels(eff, at, trained_by, root, problems, stages, needs) if members and needs else None
        expect = _label_expect(eff, members, train_m) if labels and members else None
        if labels and expect:
            _check_labels(eff, at, check_data, labels, expect, problems, needs)
        num_classes = train_m.num_classes if train_m else 0
        channels = train_m.channels if train_m else 0
        trained_by[stage.name] = stage.trains
        if needs is None:
            continue  # reported above
        plans.append(StagePlan(
            run=spec.name, stage=stage.name, spec=eff, trains=stage.trains, arch=trained.arch,
            weights=weights, needs=needs,
            teacher=_teacher_plan(eff, needs, members, num_classes, channels, labels, expect) if members else None,
            total_steps=total, step_offset=offset, num_classes=num_classes, channels=channels,
            # opened manifests are passed by their resolved URL (a builtin set is built on the driver)
            train_manifest=train_m.url if train_m else absolute(eff.data.train),
            val_manifest=(val_m.url if val_m else absolute(eff.data.val)) if eff.data.val else None,
            stage_url=join(root, stage.name), method_init=method_init,
        ))
        offset += total
    if problems:
        raise SpecError(source, problems)
    return plans


__all__ = ["METHOD_ARTIFACT", "STAGE_REF", "StagePlan", "check_here", "plan_job"]
