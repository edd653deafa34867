"""Distillation methods: one file per method, registered here by name.

Adding a method = one new file + one line in ``METHODS`` + a job file + its tests.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from kd_cluster.methods.base import (Method, MethodConfig, Needs, SetupInfo, StepOutputs, all_gather_cat,
                                     mixed_cross_entropy, soft_kl)
from kd_cluster.methods.at import AT
from kd_cluster.methods.crd import CRD
from kd_cluster.methods.dml import DML
from kd_cluster.methods.fitnet import FitNet
from kd_cluster.methods.funmatch import FixedTeacher, FunMatch, IndependentViews
from kd_cluster.methods.ie_kd import IEDML, IEKD
from kd_cluster.methods.kd import KD
from kd_cluster.methods.pad import PAD
from kd_cluster.methods.sskd import SSKD
from kd_cluster.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "kd": KD,
    "funmatch": FunMatch,
    "fixed_teacher": FixedTeacher,
    "independent_views": IndependentViews,
    "fitnet": FitNet,
    "at": AT,
    "pad": PAD,
    "crd": CRD,
    "sskd": SSKD,
    "ie_kd": IEKD,
    "ie_dml": IEDML,
    "dml": DML,
}


class MethodError(ValueError):
    """Unknown method or invalid method settings."""


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; MethodError lists the known names."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"method.name: unknown method {name!r}{hint}; known: {', '.join(METHODS)}") from None


def method_config(name: str, params: dict[str, Any]) -> MethodConfig:
    """Validate a method's own settings; MethodError names the field and the allowed keys."""
    cls = method_class(name)
    try:
        return cls.Config.model_validate(params)
    except ValidationError as exc:
        allowed = ", ".join(cls.Config.model_fields) or "(none)"
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
    """What method ``name`` with these settings needs from the loop (validates the settings)."""
    cls = method_class(name)
    return cls.needs_for(method_config(name, params))


__all__ = ["METHODS", "Method", "MethodConfig", "MethodError", "Needs", "SetupInfo", "StepOutputs", "all_gather_cat",
           "build_method", "method_class", "method_config", "method_needs", "mixed_cross_entropy", "soft_kl"]
