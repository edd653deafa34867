"""The job spec: typed, validated models of a job file. No torch, no ray here.

Every model forbids unknown keys, so a typo is an error that names the field, never a setting that is
silently ignored. Cross-field rules that need only the spec live in validators here; rules that need
the model registry, the method registry or the data (shards exist, names known) are checked by
``kd_cluster.train.plan`` before anything is started.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_OWN_SCHEMES = {"builtin", "file", "local"}
_NEEDS_BUCKET = {"s3", "s3a", "gs", "gcs", "az", "abfs", "adl", "oss", "oci"}


def check_location(value: str) -> str:
    """A storage location: a local path, ``stage:<name>``, ``builtin://...`` or an fsspec URL (``proto://...``,
    chained with ``::``) whose every protocol fsspec knows and can load here, and that parses as a URL.

    Only the form is checked (no store is contacted), so a job naming s3:// fails here, not after a cluster started.
    """
    if not value.strip():
        raise ValueError("is empty")
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    for part in value.split("::"):
        if "://" not in part:
            continue
        scheme = part.split("://", 1)[0]
        if not _SCHEME_RE.match(scheme):
            raise ValueError(f"{scheme!r} is not a URL scheme (expected e.g. s3://bucket/path or a local path)")
        if scheme.lower() in _OWN_SCHEMES:
            continue
        _check_protocol(scheme.lower())
        try:
            parts = urllib.parse.urlsplit(part)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"is not a valid URL ({exc})") from None
        if scheme.lower() in _NEEDS_BUCKET and not parts.netloc:
            raise ValueError(f"names no bucket (expected {scheme}://<bucket>/<path>)")
    return value


def _check_protocol(scheme: str) -> None:
    from fsspec.registry import known_implementations, registry

    if scheme in registry:  # already imported: usable
        return
    impl = known_implementations.get(scheme)
    if impl is None:
        raise ValueError(f"no filesystem for protocol {scheme!r} (fsspec knows: s3, gs, az, http, file, memory, ...)")
    module = impl["class"].split(".", 1)[0]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"protocol {scheme!r} is not installed here: {impl.get('err') or f'install {module}'}")


Location = Annotated[str, AfterValidator(check_location)]
"""A local path or fsspec URL, checked by :func:`check_location`."""


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(Strict):
    """A network, built by name from the model registry."""

    arch: str = Field(description="Model name: a small CNN (cnn_xs, cnn_s, cnn_m, cnn_l), a torchvision "
                      "classifier (resnet18, resnet50, ...) or a timm model as 'timm:<name>'.")
    weights: Location | None = Field(None, description="Weights to load: a local path or any fsspec URL "
                                "(.safetensors, or a torch state dict loaded with weights_only=True), "
                                "or 'stage:<name>' for the model a previous stage of this job trained.")


class TeacherMember(Strict):
    """One network of a teacher ensemble."""

    name: str | None = Field(None, description="The member's name in metrics, in 'features_from' and in a stage's "
                             "'member'; default: its arch.")
    arch: str = Field(description="Model name, as for a single teacher.")
    weights: Location | None = Field(None, description="Weights URI, or 'stage:<name>' for the model a previous stage "
                                "trained (e.g. a stage with trains: teacher and member: <this member>).")
    weight: float = Field(1.0, gt=0, description="Relative weight of this member's probabilities in the average.")
    replicas: int | None = Field(None, ge=1, description="Teacher actors for this member (placement: actors); "
                                 "default: teacher.replicas.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor of this member; default: teacher.num_gpus.")
    num_cpus: float | None = Field(None, ge=0, description="CPUs per actor of this member; default: teacher.num_cpus.")
    resource: str | None = Field(None, description="Custom Ray resource per actor of this member; default: "
                                 "teacher.resource.")

    @property
    def key(self) -> str:
        """The member's name (its arch when unnamed)."""
        return self.name or self.arch


class TeacherSpec(Strict):
    """The frozen teacher: one network (``arch``, ``weights``) or an ensemble (``members``)."""

    arch: str | None = Field(None, description="Model name: a small CNN (cnn_xs, cnn_s, cnn_m, cnn_l), a "
                             "torchvision classifier (resnet18, resnet50, ...) or a timm model as 'timm:<name>'. "
                             "Give arch, or members for an ensemble.")
    weights: Location | None = Field(None, description="Weights to load: a local path or any fsspec URL "
                                "(.safetensors, or a torch state dict loaded with weights_only=True), "
                                "or 'stage:<name>' for the model a previous stage of this job trained.")
    members: list[TeacherMember] = Field(default_factory=list, description="An ensemble: several networks whose "
                                         "predictions are averaged in probability space (weighted by 'weight').")
    features_from: str | None = Field(None, description="Ensembles: the member whose feature taps feature-based "
                                      "methods get (logit terms use the ensemble).")
    placement: Literal["colocated", "actors", "stored"] = Field(
        "colocated", description="Where the teacher runs. 'colocated': on each training worker's device. "
        "'actors': on a pool of teacher-inference actors the driver starts before the training workers (one "
        "pool per ensemble member); workers send uint8 crops plus mixup parameters and get back the outputs "
        "the method needs. 'stored': nowhere during training: its predictions on K crops of every training "
        "image were stored by `kd-cluster teacher label` (teacher.labels) and are replayed with their crops.")
    labels: Location | None = Field(None, description="placement stored: the soft-label set to replay (the folder "
                               "`kd-cluster teacher label` wrote, or its labels.json; any fsspec URL), or "
                               "'stage:<name>' for the labels an earlier stage of this job stored.")
    replicas: int = Field(1, ge=1, description="Teacher actors in the pool (placement: actors).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per teacher actor (placement: actors).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per teacher actor (placement: actors).")
    resource: str | None = Field(None, description="A custom Ray resource each teacher actor requests one "
                                 "unit of, e.g. 'teacher' for the teacher worker group in deploy/k8s.")
    prefetch: int = Field(1, ge=0, description="Steps whose teacher requests are in flight ahead of the step "
                          "being trained (placement: actors); 0 waits for each step's outputs.")
    max_in_flight: int = Field(4, ge=1, description="At most this many requests in flight per training worker "
                               "(back-pressure); the effective prefetch is min(prefetch, max_in_flight - 1).")
    max_restarts: int = Field(3, ge=-1, description="How often Ray restarts a dead teacher actor (-1: always).")
    request_timeout_s: float = Field(120.0, gt=0, description="A request not answered in this time is retried "
                                     "on another replica.")
    max_retries: int = Field(5, ge=0, description="Retries of one request before the step fails.")

    @model_validator(mode="after")
    def _one_or_members(self) -> "TeacherSpec":
        if self.members:
            if self.arch is not None or self.weights is not None:
                raise ValueError("give either arch/weights (one teacher) or members (an ensemble), not both")
            names = [m.key for m in self.members]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"members: duplicate member names {dup} (name members of the same arch)")
            if self.features_from is not None and self.features_from not in names:
                raise ValueError(f"features_from: {self.features_from!r} is not a member; members: {names}")
        else:
            if self.arch is None:
                raise ValueError("give arch (one teacher) or members (an ensemble)")
            if self.features_from is not None:
                raise ValueError("features_from names an ensemble member; this teacher has no members")
        if self.placement == "stored" and not self.labels:
            raise ValueError("placement stored replays stored soft labels: set labels to the folder "
                             "`kd-cluster teacher label` wrote")
        if self.labels and self.placement != "stored":
            raise ValueError(f"labels are replayed only with placement stored (placement is {self.placement!r})")
        return self


class MethodSpec(BaseModel):
    """The distillation method: ``name`` plus that method's own settings.

    The method's settings are validated against the method's own config by the method registry,
    so the allowed keys are listed per method there.
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Method name, e.g. kd, funmatch, fixed_teacher, independent_views, supervised.")

    def params(self) -> dict[str, Any]:
        """The method's own settings (everything but ``name``)."""
        return dict(self.model_extra or {})


class NormalizeSpec(Strict):
    """Per-channel input normalisation applied on the device after mixup-free uint8 transfer."""

    mean: list[float] = Field(description="Per-channel mean in [0, 1] units.")
    std: list[float] = Field(description="Per-channel standard deviation in [0, 1] units.")


class DataSpec(Strict):
    """Where the shards are and how batches are formed."""

    train: Location = Field(description="Train manifest: a manifest.json URL/path, its folder, or "
                       "'builtin://mnist5k/train'.")
    val: Location | None = Field(None, description="Validation manifest (same forms as train); no eval when unset.")
    image_size: int = Field(224, ge=8, le=1024, description="Side length of the crops fed to the models.")
    batch_size: int = Field(256, ge=1, description="GLOBAL batch size, split evenly over the workers.")
    eval_batch_size: int | None = Field(None, ge=1, description="Per-worker eval batch size (default: the "
                                        "per-worker train batch size).")
    loader_workers: int = Field(2, ge=0, le=64, description="Decode processes per training worker. Part of "
                                "the data cursor: keep it fixed for a run.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// shard URLs "
                                     "(credentials always come from the environment).")
    normalize: NormalizeSpec | None = Field(None, description="Input normalisation; default ImageNet "
                                            "statistics for RGB, mean 0.5 / std 0.5 for grayscale.")
    decode: Literal["cpu", "gpu"] = Field("cpu", description="Where training images are decoded. 'cpu': in the "
                                          "loader processes. 'gpu': loader processes read the bytes and draw each "
                                          "sample's crop and flip; the training worker decodes the batch on its GPU "
                                          "(nvImageCodec, the 'gpu' extra) and crops, resizes and flips there. "
                                          "Grayscale and PNG samples are decoded on the CPU. Needs CUDA where the "
                                          "job trains and resources.use_gpu.")


class AugmentSpec(Strict):
    """Train-time augmentation: Inception crop, flip, batch mixup."""

    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="Area range of the random-resized crop.")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="Aspect-ratio range of the crop.")
    flip: bool = Field(True, description="Random horizontal flip (turn off for digits and text).")
    mixup_alpha: float = Field(0.0, ge=0.0, description="Batch mixup: lambda ~ Beta(a, a) folded to "
                               "max(l, 1-l), one per batch, partner = batch rolled by one. 0 disables.")
    eval_resize_ratio: float = Field(256 / 224, ge=1.0, description="Eval: resize the shorter side to "
                                     "image_size * ratio, then center-crop image_size.")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"must be two numbers 0 < low <= high, got {list(v)}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale_max_one(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] > 1.0:
            raise ValueError(f"area fractions cannot exceed 1.0, got {list(v)}")
        return v


class ScheduleSpec(Strict):
    """How long to train and how often to log, evaluate and checkpoint (all in steps)."""

    steps: int | None = Field(None, ge=1, description="Total optimizer steps. Give steps or epochs.")
    epochs: float | None = Field(None, gt=0, description="Total epochs over the train split; converted to "
                                 "steps from the manifest's sample count and the global batch size.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up from 0.")
    decay: Literal["cosine", "quadratic", "constant", "multistep"] = Field(
        "cosine", description="LR decay after warm-up: cosine to 0; quadratic (1 - progress)^2 to 0, the patient "
        "function-matching Shampoo schedule; constant; or multistep: times gamma at each milestone.")
    milestones: list[float] = Field(default_factory=list, description="multistep: when the LR is multiplied by "
                                    "gamma, in milestone_unit (e.g. [150, 180, 210] epochs).")
    milestone_unit: Literal["epochs", "steps"] = Field("epochs", description="Unit of milestones; epochs are "
                                                       "converted with the train split's size and the global batch.")
    gamma: float = Field(0.1, gt=0, description="multistep: the LR factor applied at each milestone.")
    log_every: int = Field(20, ge=1, description="Steps between metric logs (the only host syncs).")
    eval_every: int | None = Field(None, ge=1, description="Steps between evaluations (and always at the end).")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints (and always at the end).")
    checkpoint_minutes: float | None = Field(None, gt=0, description="Also checkpoint when this many minutes passed "
                                             "since the last one (decided at fault_tolerance.check_every steps).")
    keep_checkpoints: int = Field(3, ge=1, description="How many recent checkpoints to keep.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "ScheduleSpec":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        if self.decay == "multistep":
            if not self.milestones or any(m <= 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
                raise ValueError(f"decay multistep needs milestones: increasing positive numbers, got {self.milestones}")
        elif self.milestones:
            raise ValueError(f"milestones are used only with decay: multistep (decay is {self.decay!r})")
        return self


class ShampooSpec(Strict):
    """Settings of the Shampoo optimizer (pytorch-optimizer's ScalableShampoo: blocked, grafted)."""

    block_size: int = Field(128, ge=2, description="Dimensions above this are split into blocks of this size, "
                            "each with its own preconditioners (memory and inverse cost grow with it).")
    update_every: int = Field(100, ge=1, description="Steps between recomputations of the inverse-root "
                              "preconditioners (the expensive part).")
    start_step: int = Field(25, ge=0, description="Steps of grafted (first-order) updates before preconditioning.")
    statistics_every: int = Field(1, ge=1, description="Steps between updates of the gradient statistics.")
    graft: Literal["none", "sgd", "adagrad", "rmsprop", "sqrtn"] = Field("rmsprop", description="Layer-wise "
                                                                        "update magnitude taken from this "
                                                                        "first-order method.")
    matrix_eps: float = Field(1e-6, gt=0, description="Epsilon added to the statistics matrices before the inverse root.")
    diagonal_eps: float = Field(1e-10, gt=0, description="Epsilon of the grafting method's diagonal statistics.")
    max_preconditioner_dim: int = Field(8192, ge=1, description="Dimensions larger than this are not preconditioned.")


class OptimizerSpec(Strict):
    """Optimizer and the clipping applied before each step."""

    name: Literal["adamw", "sgd", "shampoo"] = Field("adamw", description="adamw, sgd, or shampoo (settings in "
                                                     "'shampoo'; betas are its momentum and statistics decay).")
    lr: float = Field(gt=0, description="Peak learning rate (at base_batch_size when that is set).")
    base_batch_size: int | None = Field(None, ge=1, description="Linear LR scaling: the LR used is "
                                        "lr * data.batch_size / base_batch_size. Unset: lr as given.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (adamw) or L2 (sgd); applied "
                                "to weight matrices and conv kernels only, not to biases and norm scales.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw betas.")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum.")
    nesterov: bool = Field(True, description="sgd Nesterov momentum.")
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    shampoo: ShampooSpec = Field(default_factory=ShampooSpec, description="Shampoo settings (used when name is shampoo).")


class ResourcesSpec(Strict):
    """What each training worker gets."""

    num_workers: int = Field(2, ge=1, description="Training workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; bf16 autocast when amp is on.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (Ray resources).")
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    channels_last: bool = Field(False, description="channels_last memory format on GPU.")
    compile: bool = Field(False, description="torch.compile the student and a colocated or actor teacher; when "
                          "compilation fails, one warning and the model runs uncompiled.")


class FaultToleranceSpec(Strict):
    """How a run survives worker failures and preemption."""

    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train makes after a failure or "
                              "a preemption (each resumes from the latest checkpoint); -1 = forever.")
    preemption_grace_s: float = Field(90.0, gt=0, description="On SIGTERM (or a node-preemption notice) workers "
                                      "finish the step, checkpoint, and exit within this many seconds.")
    check_every: int = Field(5, ge=1, description="Steps between the ranks' agreement on 'preempted?' and "
                                "'time-based checkpoint due?' (one tiny CPU all-reduce).")
    upload_retry_s: float = Field(600.0, gt=0, description="How long a checkpoint upload keeps retrying an "
                                  "unreachable store (exponential backoff) before that checkpoint is given up.")
    lease_timeout_s: float = Field(120.0, gt=0, description="A driver refreshes the run's lease (lease.json in "
                                   "the run folder) every lease_timeout_s / 4 s; a second run/resume of the run is "
                                   "refused, and --force takes a lease over only once its heartbeat is older than "
                                   "this (what a killed or preempted driver leaves).")


class StorageSpec(Strict):
    """Where checkpoints and stage artifacts go."""

    path: Location = Field("./runs", description="Local folder or any fsspec URL (s3://bucket/prefix).")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// paths; credentials "
                                     "always come from the environment, never from the spec.")


class TelemetrySpec(Strict):
    """Metrics: W&B (rank 0), terminal progress, local JSONL."""

    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field("auto", description="auto: online "
                                                                         "when WANDB_API_KEY is set, else offline.")
    wandb_project: str = Field("kd-cluster", description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (team); default: the key's user.")
    wandb_dir: str = Field("./.kd_cluster/wandb", description="Local folder for W&B run files.")
    progress: bool = Field(True, description="Terminal progress on rank 0.")


class LabelStageSpec(Strict):
    """A stage that stores the teacher's predictions (``teacher.placement: stored`` replays them)."""

    views: int = Field(ge=1, description="Augmentation views stored per training sample (K).")
    top_k: int = Field(10, ge=1, description="Teacher probabilities stored per view (N, the largest).")
    logits: bool = Field(False, description="Store every class's teacher logit per view (float16, 2 bytes per class) "
                         "instead of the top-N probabilities: what DKD and DIST need, C / (2 N) times the bytes.")
    workers: int | None = Field(None, ge=1, description="Labelling workers on Ray (default: teacher.replicas); each "
                                "takes teacher.num_cpus / num_gpus.")
    batch: int = Field(256, ge=1, description="Images per teacher forward.")


class StageSpec(Strict):
    """One stage of a multi-stage job; ``set`` overrides the job's sections for this stage only."""

    name: str = Field(description="Stage name; its artifact is referenced as 'stage:<name>'.")
    trains: Literal["student", "teacher"] = Field("student", description="Which model this stage trains. "
                                                  "'teacher' trains the teacher spec from scratch (or its weights).")
    member: str | None = Field(None, description="With trains: teacher and an ensemble teacher: the member this "
                               "stage trains.")
    labels: LabelStageSpec | None = Field(None, description="Instead of training: store the teacher's top-N "
                                          "predictions on K views of every training sample; later stages replay "
                                          "them with teacher.placement: stored and teacher.labels: stage:<name>.")
    set: dict[str, Any] = Field(default_factory=dict, description="Section overrides for this stage, "
                                "e.g. {method: {name: supervised}, schedule: {steps: 300}}.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError(f"stage name {v!r} must match {RUN_NAME_RE.pattern}")
        return v

    @model_validator(mode="after")
    def _labels_train_nothing(self) -> "StageSpec":
        if self.labels is not None and (self.trains != "student" or self.member is not None):
            raise ValueError("a stage with labels stores the teacher's predictions and trains nothing: drop "
                             "trains/member")
        return self

    @field_validator("set")
    @classmethod
    def _set_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        allowed = {"teacher", "student", "method", "data", "augment", "schedule", "optimizer", "resources"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"cannot override {bad} in a stage; allowed: {sorted(allowed)}")
        return v


class JobSpec(Strict):
    """A whole job file."""

    name: str = Field(description="Run name: checkpoints live under storage.path/<name>; running a job "
                      "with the same name resumes it. Also the W&B run id.")
    seed: int = Field(0, ge=0, description="Seed of everything: init, data order, augmentation, mixup.")
    teacher: TeacherSpec | None = Field(None, description="The frozen teacher (methods that need one).")
    student: ModelSpec = Field(description="The model being trained.")
    method: MethodSpec = Field(description="Distillation method and its settings.")
    data: DataSpec
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    schedule: ScheduleSpec
    optimizer: OptimizerSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec)
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec)
    stages: list[StageSpec] = Field(default_factory=list, description="Optional stages run in order; "
                                    "empty = one stage named 'main' with the sections as given.")

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError(f"run name {v!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                             "and start with a letter or digit")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        if self.data.batch_size % self.resources.num_workers:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by "
                             f"resources.num_workers ({self.resources.num_workers})")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stages: duplicate stage names {dup}")
        return self
