"""Distillation methods: registered here by name, with their settings and their torch module.

Adding a method = its torch module in a new file + its settings class in ``settings.py`` + one line in
``METHODS`` + a job file + its tests. The settings (a pydantic model whose ``needs()`` says what the method
asks of the loop) are apart from the torch module because checking a job file (``kd-cluster validate``,
the planner) must not import torch, and a Python file cannot be half imported; the torch module is
imported only when a method is built (or its class is asked for).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kd_cluster.methods.settings import (ATConfig, CRDConfig, DMLConfig, FitNetConfig, FixedTeacherConfig,
                                         FunMatchConfig, IEDMLConfig, IEKDConfig, IndependentViewsConfig, KDConfig,
                                         MethodConfig, Needs, PADConfig, SSKDConfig, SupervisedConfig)

if TYPE_CHECKING:
    from kd_cluster.methods.base import Method


@dataclass(frozen=True)
class Registered:
    """A method in the registry: its settings class and its torch module (``"file:Class"`` in this package,
    imported on first use; or the class itself)."""

    settings: type[MethodConfig]
    implementation: str | type

    def load(self) -> type[Method]:
        """The method's class (imports its file, hence torch)."""
        if not isinstance(self.implementation, str):
            return self.implementation
        module, cls = self.implementation.split(":")
        return getattr(importlib.import_module(f"kd_cluster.methods.{module}"), cls)


METHODS: dict[str, Registered] = {
    "supervised": Registered(SupervisedConfig, "supervised:Supervised"),
    "kd": Registered(KDConfig, "kd:KD"),
    "funmatch": Registered(FunMatchConfig, "funmatch:FunMatch"),
    "fixed_teacher": Registered(FixedTeacherConfig, "funmatch:FixedTeacher"),
    "independent_views": Registered(IndependentViewsConfig, "funmatch:IndependentViews"),
    "fitnet": Registered(FitNetConfig, "fitnet:FitNet"),
    "at": Registered(ATConfig, "at:AT"),
    "pad": Registered(PADConfig, "pad:PAD"),
    "crd": Registered(CRDConfig, "crd:CRD"),
    "sskd": Registered(SSKDConfig, "sskd:SSKD"),
    "ie_kd": Registered(IEKDConfig, "ie_kd:IEKD"),
    "ie_dml": Registered(IEDMLConfig, "ie_kd:IEDML"),
    "dml": Registered(DMLConfig, "dml:DML"),
}


class MethodError(ValueError):
    """Unknown method or invalid method settings."""


def _entry(name: str) -> Registered:
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"method.name: unknown method {name!r}{hint}; known: {', '.join(METHODS)}") from None


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (imports torch); MethodError lists the known names."""
    entry = _entry(name)
    cls = entry.load()
    assert cls.Config is entry.settings, f"method {name!r}: {cls.__name__}.Config is not its registered settings"
    return cls


def method_config(name: str, params: dict[str, Any]) -> MethodConfig:
    """Validate a method's own settings; MethodError names the field and the allowed keys. No torch."""
    settings = _entry(name).settings
    try:
        return settings.model_validate(params)
    except ValidationError as exc:
        allowed = ", ".join(settings.model_fields) or "(none)"
        lines = []
        for e in exc.errors():
            field = "method." + ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"{field}: unknown setting for method {name!r}; allowed: {allowed}")
            else:
                lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
        raise MethodError("\n".join(lines)) from None


def build_method(name: str, params: dict[str, Any]) -> Method:
    """Instantiate a method from its name and settings."""
    return method_class(name)(method_config(name, params))


def method_needs(name: str, params: dict[str, Any]) -> Needs:
    """What method ``name`` with these settings needs from the loop (validates the settings). No torch."""
    return method_config(name, params).needs()


_TORCH_NAMES = {"Method": "base", "SetupInfo": "base", "StepOutputs": "base", "all_gather_cat": "base",
                "mixed_cross_entropy": "base", "soft_kl": "base"}


def __getattr__(name: str) -> Any:
    """The torch side of the package (the ``Method`` base class and its helpers), imported on first use."""
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(f"kd_cluster.methods.{_TORCH_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "Method", "MethodConfig", "MethodError", "Needs", "Registered", "SetupInfo", "StepOutputs",
           "all_gather_cat", "build_method", "method_class", "method_config", "method_needs", "mixed_cross_entropy",
           "soft_kl"]
