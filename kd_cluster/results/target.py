"""What ``eval`` and ``export`` work on: a finished stage of a run, or a weights file with its architecture,
together with the input it expects (size, channels, normalisation, the eval resize) and where it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kd_cluster.results.store import STAGE_MARKER, find_run, read_job, run_progress, spec_for_resume
from kd_cluster.storage import Store
from kd_cluster.urls import absolute


class TargetError(ValueError):
    """A model that cannot be used as asked (no such stage, a stage not finished, input settings that do not
    fit the data); the message is one line."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: the eval (center) view, then ``(x / 255 - mean) / std``."""

    image_size: int
    eval_resize_ratio: float = 1.0
    """Resize the shorter side to ``int(image_size * ratio)``, then center-crop ``image_size``."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean of [0, 1] pixels; None: the training default for the data's channel count."""
    std: tuple[float, ...] | None = None

    def normalization(self, channels: int) -> tuple[list[float], list[float]]:
        """(mean, std) for ``channels``: the given ones, or what training uses by default."""
        if self.mean is not None and self.std is not None:
            if len(self.mean) != channels or len(self.std) != channels:
                raise TargetError(f"--mean/--std have {len(self.mean)}/{len(self.std)} values; the data has "
                                  f"{channels} channel(s)")
            return list(self.mean), list(self.std)
        from kd_cluster.models import default_normalization

        return default_normalization(channels)


@dataclass(frozen=True)
class Member:
    """One network of a teacher (a single teacher has one): architecture, weights, weight in the ensemble."""

    arch: str
    weights: str
    weight: float = 1.0


@dataclass
class ModelRef:
    """A trained model: its architecture and weights, the input it expects, and its origin."""

    arch: str
    weights: str
    preprocess: Preprocess
    endpoint_url: str | None = None
    """S3-compatible endpoint of the storage holding ``weights``."""
    run: str | None = None
    stage: str | None = None
    run_url: str | None = None
    job_source: str | None = None
    data_val: str | None = None
    """The run's validation split (the default data of ``eval``)."""
    data_train: str | None = None
    data_endpoint_url: str | None = None
    teacher: tuple[Member, ...] = ()
    """The teacher this stage was trained against (methods that use one): its member(s); empty when it has none
    whose weights can be loaded."""
    final_metrics: dict[str, float] = field(default_factory=dict)
    """The stage's final metrics (its last evaluation), from ``stage.json``."""

    @property
    def label(self) -> str:
        """``run/stage`` or the weights' file name."""
        return f"{self.run}/{self.stage}" if self.run else self.weights.rstrip("/").rsplit("/", 1)[-1]

    def origin(self) -> dict[str, Any]:
        """Where the model came from, for metadata."""
        return {"run": self.run, "stage": self.stage, "run_url": self.run_url, "job_source": self.job_source,
                "weights": self.weights, "arch": self.arch,
                "teacher": [asdict(m) for m in self.teacher] or None}

    def as_teacher(self) -> tuple[Member, ...]:
        """This model as the one member of a teacher."""
        return (Member(self.arch, self.weights),)


def from_weights(uri: str, arch: str, preprocess: Preprocess, endpoint_url: str | None = None) -> ModelRef:
    """A weights file (local path or any fsspec URL) and the architecture it belongs to."""
    return ModelRef(arch=arch, weights=absolute(uri), preprocess=preprocess, endpoint_url=endpoint_url)


def from_run(run: str, storage: str = "./runs", stage: str | None = None,
             endpoint_url: str | None = None) -> ModelRef:
    """A finished stage of a run (by name under ``storage``, or the run's folder/URL); the last stage by default.

    The stage's model, the teacher it was trained against and its input come from the run's stored spec,
    resolved as the run resolved them (``stage:<name>`` weights become that stage's artifact)."""
    from kd_cluster.train import plan_job  # the run's own resolution of stages, models and weights

    url = find_run(run, storage, endpoint_url)
    spec, source = spec_for_resume(url, endpoint_url)
    plans = plan_job(spec, source, check_data="none")
    names = [p.stage for p in plans]
    if stage is None:
        plan = plans[-1]
    elif stage in names:
        plan = plans[names.index(stage)]
    else:
        raise TargetError(f"{url}: --stage {stage!r}: the run has stages {', '.join(names)}")
    store = Store(plan.stage_url, spec.storage.endpoint_url)
    if not store.exists(STAGE_MARKER):
        prog = run_progress(url, endpoint_url)
        finished = [s["stage"] for s in prog["stages"] if s["state"] == "finished"]
        raise TargetError(f"{url}: stage {plan.stage!r} has not finished (run state: {prog['state']}, in stage "
                          f"{prog['stage']}); finished stages: {', '.join(finished) or 'none'} (--stage)")
    marker = store.read_json(STAGE_MARKER)
    s = plan.spec
    norm = s.data.normalize
    pre = Preprocess(image_size=s.data.image_size, eval_resize_ratio=s.augment.eval_resize_ratio,
                     mean=tuple(norm.mean) if norm else None, std=tuple(norm.std) if norm else None)
    return ModelRef(arch=plan.arch, weights=plan.artifact_url, preprocess=pre, endpoint_url=spec.storage.endpoint_url,
                    run=spec.name, stage=plan.stage, run_url=url, job_source=read_job(url, endpoint_url).get("source"),
                    data_val=s.data.val, data_train=s.data.train, data_endpoint_url=s.data.endpoint_url,
                    teacher=tuple(Member(m.arch, m.weights, m.weight) for m in plan.teacher.members)
                    if plan.teacher and all(m.weights for m in plan.teacher.members) else (),
                    final_metrics=dict(marker.get("final_metrics", {})))


__all__ = ["Member", "ModelRef", "Preprocess", "TargetError", "from_run", "from_weights"]
