"""Distillation methods, one file each: its settings class, its torch module and ``@register("name")``.

Adding a method = one new file in this folder (plus its job file and its tests); the registry finds it, because
importing this package imports every module of the folder whose name does not start with ``_``. Those imports
load no torch (see :mod:`kd_cluster.methods.base`): checking a job file needs every method's settings and stays
fast; torch is imported when a method is built.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pydantic import ValidationError

from kd_cluster.methods.base import (METHODS, Method, MethodConfig, MethodError, Module, Needs, SetupInfo, StepOutputs,
                                     all_gather_cat, lookup, mixed_cross_entropy, register, soft_kl)

_NOT_METHODS = {"base"}
_scanned: set[str] = set()


def discover() -> None:
    """Import every method module of this package (its ``@register`` lines run); also those of folders appended to
    this package's ``__path__`` (methods kept outside the source tree). Each folder is scanned once."""
    new = [p for p in __path__ if p not in _scanned]
    for info in pkgutil.iter_modules(new):
        if not info.name.startswith("_") and info.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{info.name}")
    _scanned.update(new)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; MethodError lists the known names."""
    discover()
    return lookup(name)


def method_config(name: str, params: dict[str, Any]) -> MethodConfig:
    """Validate a method's own settings; MethodError names the field and the allowed keys. No torch."""
    settings = method_class(name).Config
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
    """Instantiate a method (a torch module) from its name and settings."""
    return method_class(name)(method_config(name, params))


def method_needs(name: str, params: dict[str, Any]) -> Needs:
    """What method ``name`` with these settings needs from the loop (validates the settings). No torch."""
    return method_config(name, params).needs()


discover()

__all__ = ["METHODS", "Method", "MethodConfig", "MethodError", "Module", "Needs", "SetupInfo", "StepOutputs",
           "all_gather_cat", "build_method", "discover", "method_class", "method_config", "method_needs",
           "mixed_cross_entropy", "register", "soft_kl"]
