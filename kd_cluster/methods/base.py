"""What every method is: settings that say what it needs, and a torch module that turns one step's outputs into
named loss terms. A method is one file of this package (its settings class, its module, ``@register``).

A method declares what it needs (a teacher? which view of the image does the teacher see? labels?
which feature taps of student and teacher? the per-sample index?) and the training loop asks it;
nothing outside this package branches on a method's name.

Life cycle, driven by the loop on every worker:

1. ``cfg.needs()`` (the method's settings, a :class:`MethodConfig`) says what the loop must provide; the planner
   and ``kd-cluster validate`` ask it too, and an instance has it as ``needs``.
2. ``setup(probe, info)``: called once with the outputs of a no-grad forward on a dummy batch, so the
   method can size its own trainable modules (regressors, embeddings, heads, peer networks) and
   buffers (memory banks) from the real feature shapes. ``__init__`` must stay cheap: no modules that
   depend on shapes there.
3. The method's weights may then be loaded from ``cfg.init`` (an earlier stage's ``method.safetensors``),
   the optimizer is built over student + method parameters, and a checkpoint is restored into both.
4. Each step: ``expand(x)`` may turn the input batch into a bigger one (e.g. rotated copies), the loop
   runs the student and teacher on it and calls ``forward(StepOutputs)`` for named loss terms.

Under DDP the student is wrapped in DistributedDataParallel; the gradients of the method's own
parameters are averaged across ranks by the loop (one all-reduce per step), so every rank's method
modules stay identical. Buffers a method updates itself (memory banks) must be updated with the same
values on every rank: gather what you write with :func:`all_gather_cat`.

**Why a method file imports no torch.** Checking a job file (``kd-cluster validate``, ``submit``, the planner)
needs every method's settings, and must answer without the seconds that importing torch takes. So this module
and the method files use :data:`torch`, :data:`F`, :data:`nn` and :data:`dist` from here: names that import
torch on first use. :class:`Method` (and :class:`Module`, for a method's helper networks) is made a real
``torch.nn.Module`` subclass when it is first instantiated: the class a file defines is a plain class until a
method is built, and its instances are ``nn.Module`` instances (parameters, buffers, ``state_dict``, ``.to``).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _LazyModule(ModuleType):
    """A module imported when one of its attributes is first read (then read directly, as from the module)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)  # the next read finds it here, without this call
        return value


torch: Any = _LazyModule("torch")
F: Any = _LazyModule("torch.nn.functional")
nn: Any = _LazyModule("torch.nn")
dist: Any = _LazyModule("torch.distributed")


class _TorchOnUse(type):
    """Metaclass of :class:`Module`: calling a class builds an instance of its torch version, the class with
    ``torch.nn.Module`` mixed in (made once per class, kept as ``cls._torch``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return type.__call__(torch_class(cls), *args, **kwargs)


def torch_class(cls: type) -> type:
    """``cls`` with ``torch.nn.Module`` as its last base (``cls`` itself if it has it already)."""
    if issubclass(cls, nn.Module):
        return cls
    real = cls.__dict__.get("_torch")
    if real is None:
        real = _TorchOnUse(cls.__name__, (cls, nn.Module), {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                                             "__qualname__": f"{cls.__qualname__}._torch"})
        cls._torch = real  # pickle finds the torch version as <module>.<Class>._torch
    return real


class Module(metaclass=_TorchOnUse):
    """Base of a torch module declared in a method file: write it as a subclass of ``torch.nn.Module``
    (``super().__init__()`` first, submodules as attributes); it becomes one when it is instantiated."""

    _torch: ClassVar[type | None] = None


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
    full_logits: str | None = None
    """Why stored labels must hold every class's logit to serve this method (``teacher label --logits``); None:
    the top-N probabilities serve it."""


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


class LogitStandardization(MethodConfig):
    """Settings of the methods that can z-score logits before their temperature softmax (Sun et al., CVPR 2024)."""

    logit_standardization: bool = Field(False, description="Z-score each sample's teacher and student logits "
                                        "(minus their mean, over their standard deviation) before dividing by the "
                                        "temperature: the student matches the teacher's logit relations, not their "
                                        "range (Sun et al., CVPR 2024). The label CE uses the raw logits.")


def check_arch(name: str) -> str:
    """A pydantic validator body: ``name`` must be a model the registry can build."""
    from kd_cluster.models import ModelError, check_model_name

    try:
        check_model_name(name)
    except ModelError as exc:
        raise ValueError(str(exc)) from None
    return name


@dataclass(frozen=True)
class SetupInfo:
    """Facts about the run a method may need when it builds its modules."""

    num_classes: int
    num_samples: int
    """Samples in the train split (for memory banks indexed by the per-sample index)."""
    world_size: int
    total_steps: int
    channels: int = 3


@dataclass
class StepOutputs:
    """What the loop hands a method after the forward passes of one step."""

    student_logits: torch.Tensor | None
    """None when the method's needs say ``student=False``."""
    labels: torch.Tensor
    lam: float
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    """Per-sample dataset indices of the (un-expanded) batch, when ``needs.index``."""
    images: torch.Tensor | None = None
    """The normalised (mixed, expanded) input the student saw, for methods that run their own networks."""
    step: int = 0
    """The optimizer step being computed (0-based)."""


class Method(Module):
    """A distillation method. Subclasses set ``Config`` (their settings class, which says what the method
    needs), implement ``forward`` and are registered by name with :func:`register`."""

    Config: ClassVar[type[MethodConfig]]

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.needs: Needs = type(self).needs_for(cfg)

    @classmethod
    def needs_for(cls, cfg: MethodConfig) -> Needs:
        """What this method needs with these settings: the settings say it."""
        return cfg.needs()

    def setup(self, probe: StepOutputs, info: SetupInfo) -> None:
        """Build shape-dependent modules and buffers from a probe forward (no grad, dummy input)."""

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The batch student and teacher actually see, from the (mixed) normalised input. Default: as is."""
        return x

    def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Named, already weighted loss terms; the loop minimises their sum and logs each."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Extra scalars to log at log steps (host values; called on rank 0 only). Default: none."""
        return {}


class MethodError(ValueError):
    """Unknown method or invalid method settings."""


METHODS: dict[str, type[Method]] = {}
"""Every method by name, as its file registered it (``@register``); its settings class is its ``Config``."""


def register(name: str) -> Any:
    """Class decorator: the method is known as ``name`` (``method.name`` in a job file)."""

    def add(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method) and issubclass(cls.__dict__.get("Config", object),
                                                                               MethodConfig)):
            raise TypeError(f"@register({name!r}): {cls!r} must be a Method subclass with its own Config "
                            "(a MethodConfig subclass)")
        if METHODS.get(name, cls) is not cls:
            raise ValueError(f"@register({name!r}): {METHODS[name].__module__} registered that name already")
        METHODS[name] = cls
        return cls

    return add


def lookup(name: str) -> type[Method]:
    """The method registered as ``name``; MethodError lists the known names."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"method.name: unknown method {name!r}{hint}; known: {', '.join(METHODS)}") from None


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every DDP rank along dim 0 (no gradient); ``t`` itself without DDP.

    Every rank must call it with the same shape. Use it to update buffers (memory banks) identically
    on all ranks.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=0)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, lam: float,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against mixup targets: lam * CE(y) + (1 - lam) * CE(y rolled by one)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if lam >= 1.0:
        return ce
    ce_b = F.cross_entropy(logits, labels.roll(1, dims=0), label_smoothing=label_smoothing)
    return lam * ce + (1.0 - lam) * ce_b


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row minus its mean, over its (unbiased) standard deviation plus ``eps``: logit standardization."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, averaged over the batch, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    ``teacher_probs`` replaces softmax(teacher_logits / T) when the target is built elsewhere.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_probs is None:
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(log_p_s, teacher_probs.float(), reduction="batchmean")
    return kl * (t * t)


__all__ = ["METHODS", "F", "LogitStandardization", "Method", "MethodConfig", "MethodError", "Module", "Needs",
           "SetupInfo", "StepOutputs", "all_gather_cat", "check_arch", "dist", "lookup", "mixed_cross_entropy", "nn",
           "register", "soft_kl", "standardize", "torch", "torch_class"]
