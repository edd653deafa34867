"""What each method is, without torch: its settings (a pydantic model per method, unknown keys are errors)
and what it needs from the training loop (:class:`Needs`), for the planner, ``kd-cluster validate`` and the
schema. The torch modules that implement the methods are in this package's other files.

A Python file cannot be half imported: a method's settings live here, apart from its torch module, so
that checking a job file never imports torch (see ``kd_cluster/methods/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True)
class Needs:
    """What a method asks of the loop.

    teacher_view: "same" (teacher and student see the very same augmented, mixed-up tensor),
    "center" (teacher sees the un-augmented center crop, no mixup), or "independent" (teacher sees a
    second, independently drawn crop of the same image, mixed with the same lambda and partner).
    """

    teacher: bool
    teacher_view: Literal["same", "center", "independent"] = "same"
    labels: bool = False
    student: bool = True
    """False: the stage trains only the method's own modules (e.g. a head on the frozen teacher); the
    student is not run and not updated."""
    student_features: tuple[str, ...] = ()
    """Feature taps of the student (layer names, checked when the model is built)."""
    teacher_features: tuple[str, ...] = ()
    """Feature taps of the teacher."""
    index: bool = False
    """The per-sample dataset index (``idx`` in the shards), e.g. for memory banks."""
    live_teacher: str | None = None
    """Why this method needs the teacher to run during training, whatever its settings (None: stored soft
    labels, the teacher's predictions on crops fixed in advance, can serve it; ``teacher.placement: stored``)."""


class MethodConfig(BaseModel):
    """Base of every method's own settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    init: str | None = Field(None, description="Weights of this method's own modules to start from: a URI "
                             "or 'stage:<name>' (that stage's method.safetensors). Keys absent from the "
                             "file keep their fresh initialisation; keys the method does not have are errors.")

    def needs(self) -> Needs:
        """What the method with these settings needs from the loop (feature taps usually come from the
        settings). Every method's settings class says it."""
        raise NotImplementedError(f"{type(self).__name__}.needs()")


def check_arch(name: str) -> str:
    """A pydantic validator body: ``name`` must be a model the registry can build."""
    from kd_cluster.models import ModelError, check_model_name

    try:
        check_model_name(name)
    except ModelError as exc:
        raise ValueError(str(exc)) from None
    return name


class CEKDConfig(MethodConfig):
    """Weights of the label cross-entropy and of the optional logit KD a feature method adds to its own loss."""

    ce_weight: float = Field(1.0, ge=0.0, description="Weight of the label cross-entropy (mixup-aware).")
    kd_weight: float = Field(0.0, ge=0.0, description="Weight of T^2 * KL(p_t^T || p_s^T) on the logits (0: off).")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the KD term.")


class SupervisedConfig(MethodConfig):
    """Settings of ``supervised``."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the CE.")

    def needs(self) -> Needs:
        return Needs(teacher=False, labels=True)


class KDConfig(MethodConfig):
    """Settings of ``kd``: loss = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE."""

    temperature: float = Field(4.0, gt=0, description="Softmax temperature T.")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="Weight of the KL term; CE gets 1 - alpha.")

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="same", labels=True)


class FunMatchConfig(MethodConfig):
    """Settings of the function-matching family: loss = T^2 * KL(p_t^T || p_s^T)."""

    temperature: float = Field(1.0, gt=0, description="Softmax temperature T (the paper uses 1).")

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="same", labels=False,
                     live_teacher="function matching trains on the teacher's prediction for the very image the "
                     "student sees, cropped and mixed anew at every step; stored labels hold predictions for crops "
                     "fixed in advance")


class FixedTeacherConfig(FunMatchConfig):
    """Settings of ``fixed_teacher`` (the function-matching baseline whose teacher sees the center crop)."""

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="center", labels=False)


class IndependentViewsConfig(FunMatchConfig):
    """Settings of ``independent_views`` (the baseline whose teacher sees an independent crop)."""

    def needs(self) -> Needs:
        return Needs(teacher=True, teacher_view="independent", labels=False,
                     live_teacher="independent_views needs the teacher's prediction on a second crop drawn anew at "
                     "every step, mixed like the student's")


class FitNetConfig(CEKDConfig):
    """Settings of ``fitnet``."""

    student_layer: str = Field(description="Student feature tap (the guided layer), e.g. layer2.")
    teacher_layer: str = Field(description="Teacher feature tap (the hint layer), e.g. layer2.")
    hint_weight: float = Field(100.0, ge=0.0, description="Weight of the hint loss (mean squared error).")
    regressor: Literal["conv", "conv_bn"] = Field("conv", description="conv: 1x1 conv; conv_bn: 1x1 conv "
                                                  "+ BatchNorm (a linear layer for vector features).")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


class ATConfig(CEKDConfig):
    """Settings of ``at``."""

    student_layers: list[str] = Field(min_length=1, description="Student feature taps (maps), e.g. "
                                      "[layer1, layer2, layer3].")
    teacher_layers: list[str] = Field(min_length=1, description="Teacher feature taps, paired in order with "
                                      "student_layers.")
    beta: float = Field(1000.0, ge=0.0, description="Attention loss weight; the loss uses beta / 2.")
    p: float = Field(2.0, gt=0.0, description="Power of the activations in the attention map.")

    @model_validator(mode="after")
    def _paired(self) -> "ATConfig":
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"student_layers ({len(self.student_layers)}) and teacher_layers "
                             f"({len(self.teacher_layers)}) must pair up one to one")
        return self

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, student_features=tuple(self.student_layers),
                     teacher_features=tuple(self.teacher_layers))


class PADConfig(CEKDConfig):
    """Settings of ``pad``."""

    student_layer: str = Field(description="Student feature tap, pooled to a vector (e.g. flatten, layer3).")
    teacher_layer: str = Field(description="Teacher feature tap, pooled to a vector.")
    mode: Literal["pad", "l2"] = Field("pad", description="pad: uncertainty-weighted distance; l2: plain "
                                       "feature L2 through the connector (the warm-up stage).")
    feature_weight: float = Field(1.0, ge=0.0, description="Weight of the feature term.")
    eps: float = Field(1e-6, gt=0.0, description="Added to sigma^2 in the denominator.")
    warmup_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of the stage's steps over which "
                                   "the uncertainty weighting ramps in linearly (0: from the first step).")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


class CRDConfig(CEKDConfig):
    """Settings of ``crd``."""

    student_layer: str = Field(description="Student feature tap, pooled to a vector (the penultimate, e.g. flatten).")
    teacher_layer: str = Field(description="Teacher feature tap, pooled to a vector.")
    feat_dim: int = Field(128, ge=1, description="Embedding width of both memory banks.")
    num_negatives: int = Field(16384, ge=1, description="Negatives K per sample (capped at N - 1).")
    nce_temperature: float = Field(0.07, gt=0.0, description="Temperature tau of the scores.")
    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="Memory-bank momentum.")
    crd_weight: float = Field(0.8, ge=0.0, description="Weight of the two NCE losses (their sum).")
    negatives_seed: int = Field(0, ge=0, description="Seed of the negative sampling (with the step and rank).")

    def needs(self) -> Needs:
        return Needs(teacher=True, labels=True, index=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


class SSKDConfig(MethodConfig):
    """Settings of ``sskd``."""

    phase: Literal["head", "student"] = Field("student", description="'head': train the teacher's "
                                              "self-supervision head on the frozen teacher (a stage of its "
                                              "own); 'student': distill, with the head from init: stage:<head stage>.")
    teacher_layer: str = Field("flatten", description="Feature tap of the teacher's pooled feature (the "
                               "input of its classifier).")
    student_layer: str = Field("flatten", description="Feature tap of the student's pooled feature.")
    ce_weight: float = Field(0.1, ge=0, description="Weight of the label CE on the originals.")
    kd_weight: float = Field(0.9, ge=0, description="Weight of the KD term on the originals.")
    tf_weight: float = Field(2.7, ge=0, description="Weight of the KD term on the rotated views.")
    ss_weight: float = Field(10.0, ge=0, description="Weight of the similarity-matrix KL.")
    kd_temperature: float = Field(4.0, gt=0, description="Temperature of the KD term on the originals.")
    tf_temperature: float = Field(4.0, gt=0, description="Temperature of the KD term on the rotated views.")
    ss_temperature: float = Field(0.5, gt=0, description="Temperature of the similarity-matrix KL.")
    tf_keep: float = Field(1.0, ge=0, le=1, description="Fraction of the rotated views the teacher "
                           "classifies wrongly that are kept (those whose true label ranks highest).")
    ss_keep: float = Field(0.75, ge=0, le=1, description="Fraction of the similarity rows the teacher's "
                           "head gets wrong that are kept (those whose true source ranks highest).")

    def needs(self) -> Needs:
        if self.phase == "head":
            return Needs(teacher=True, student=False, teacher_features=(self.teacher_layer,))
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


Variant = Literal["at", "ft", "od"]


class IEConfig(MethodConfig):
    """Settings shared by ``ie_kd`` and ``ie_dml``."""

    variant: Variant = Field("at", description="Distance between factors: at (attention maps), ft (L1 of "
                             "L2-normalised factors), od (L2 of ReLU'd, normalised factors).")
    factor_ratio: float = Field(0.5, gt=0, le=4, description="Factor channels = round(ratio x the compacted "
                                "feature's channels).")
    inh_weight: float = Field(1.0, ge=0, description="Weight of the inheritance loss.")
    exp_weight: float = Field(1.0, ge=0, description="Weight of the exploration loss (entered negated).")

    def factor_channels(self, channels: int) -> int:
        return max(1, round(self.factor_ratio * channels))


class IEKDConfig(IEConfig):
    """Settings of ``ie_kd``."""

    phase: Literal["autoencoder", "student"] = Field("student", description="'autoencoder': train the "
                                                     "auto-encoder on the frozen teacher (a stage of its own); "
                                                     "'student': distill, with init: stage:<autoencoder stage>.")
    teacher_layer: str = Field("stage3", description="Feature tap of the teacher's feature map to compact.")
    student_layer: str = Field("stage3", description="Feature tap of the student's feature map to split "
                               "(same spatial size as the teacher's).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the CE.")

    def needs(self) -> Needs:
        if self.phase == "autoencoder":
            return Needs(teacher=True, student=False, teacher_features=(self.teacher_layer,))
        return Needs(teacher=True, labels=True, student_features=(self.student_layer,),
                     teacher_features=(self.teacher_layer,))


class IEDMLConfig(IEConfig):
    """Settings of ``ie_dml``."""

    peer_arch: str = Field(description="Model name of the second student (trained from scratch with the first).")
    student_layer: str = Field("stage3", description="Feature tap of the job's student.")
    peer_layer: str = Field("stage3", description="Feature tap of the peer (same spatial size as the student's).")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the mutual-learning KL.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the mutual-learning KL.")
    rec_weight: float = Field(1.0, ge=0, description="Weight of each auto-encoder's reconstruction loss.")

    @field_validator("peer_arch")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_arch(v)

    def needs(self) -> Needs:
        return Needs(teacher=False, labels=True, student_features=(self.student_layer,))


class DMLConfig(MethodConfig):
    """Settings of ``dml``."""

    peers: list[str] = Field(min_length=1, description="Model names of the other students (the job's "
                             "student is the first); each is trained from scratch alongside it.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the mimicry KL (the paper: 1).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the mimicry KL (the paper: 1).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of every network's CE.")

    @field_validator("peers")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return [check_arch(a) for a in v]

    def needs(self) -> Needs:
        return Needs(teacher=False, labels=True)


__all__ = ["ATConfig", "CEKDConfig", "CRDConfig", "DMLConfig", "FitNetConfig", "FixedTeacherConfig",
           "FunMatchConfig", "IEConfig", "IEDMLConfig", "IEKDConfig", "IndependentViewsConfig", "KDConfig",
           "MethodConfig", "Needs", "PADConfig", "SSKDConfig", "SupervisedConfig", "Variant", "check_arch"]
