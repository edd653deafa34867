"""Load a job file: safe YAML, ``extends:`` bases, dotted command-line overrides, typed validation.

Errors are :class:`SpecError`: they name the file, the field and what is allowed, and the CLI turns
them into exit code 2 before any cluster resource is asked for.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kd_cluster.config.spec import JobSpec, StageSpec


class SpecError(ValueError):
    """A job file (or an override) is not a valid job spec."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid job spec\n" + "\n".join(f"  - {p}" for p in problems))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(str(path), [f"the top level must be a mapping, got {type(data).__name__}"])
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a job file and its ``extends:`` chain (paths relative to the file) into one mapping."""
    p = Path(path).resolve()
    if p in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, p))
        raise SpecError(str(path), [f"extends: cycle {chain}"])
    data = _read_yaml(p)
    bases = data.pop("extends", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SpecError(str(path), ["extends: must be a path or a list of paths (relative to this file)"])
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, load_raw(p.parent / b, (*_seen, p)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise SpecError("command line", [f"override {text!r} must look like key.sub=value"])
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError("command line", [f"override {text!r}: empty key segment in {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError("command line", [f"override {text!r}: value is not valid YAML ({exc})"]) from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw mapping (``stages`` entries are addressed by stage name)."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
                if not match:
                    names = [s.get("name") for s in node if isinstance(s, dict)]
                    raise SpecError("command line", [f"override {text!r}: no stage named {part!r}; stages: {names}"])
                node = match[0]
                continue
            if not isinstance(node, dict):
                raise SpecError("command line", [f"override {text!r}: {'.'.join(parts[:i])} is not a mapping"])
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        if not isinstance(node, dict):
            raise SpecError("command line", [f"override {text!r}: {'.'.join(parts[:-1])} is not a mapping"])
        node[parts[-1]] = value
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location through nested models; None when it leaves the models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...] annotations, else the annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One readable line per problem: the dotted field, what is wrong, what is allowed."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = prefix + ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{field}: unknown field{hint}; allowed: {', '.join(allowed)}")
        elif kind == "missing":
            lines.append(f"{field}: required field is missing")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{field}: {err['msg']}{got_s}")
    return lines


def validate_spec(data: dict[str, Any], source: str) -> JobSpec:
    """Typed validation of a raw mapping, then of every stage's effective spec."""
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, format_validation_error(exc, JobSpec)) from None
    problems: list[str] = []
    for i, stage in enumerate(spec.stages):
        try:
            stage_spec(spec, stage)
        except ValidationError as exc:
            problems += format_validation_error(exc, JobSpec, prefix=f"stages[{i}].set.")
    if problems:
        raise SpecError(source, problems)
    return spec


def apply_profile(data: dict[str, Any], profile: str | None, source: str) -> dict[str, Any]:
    """Take the ``profiles:`` mapping out of a job and merge the named profile over the job.

    A profile is a partial job (e.g. ``smoke``: the same job on the builtin mnist5k data for a few steps)
    merged like an ``extends:`` child. Without ``profile`` the profiles are only checked to be mappings.
    """
    profiles = data.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise SpecError(source, ["profiles: must map profile names to partial job sections"])
    if profile is None:
        return data
    if profile not in profiles:
        known = ", ".join(profiles) or "(this job defines none)"
        raise SpecError(source, [f"profile {profile!r} is not defined in the job's 'profiles'; known: {known}"])
    return deep_merge(data, profiles[profile])


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None, profile: str | None = None) -> JobSpec:
    """Load, merge ``extends:``, apply a profile, apply overrides and validate a job file."""
    data = apply_profile(load_raw(path), profile, str(path))
    data = apply_overrides(data, overrides or [])
    return validate_spec(data, str(path))


def stage_spec(spec: JobSpec, stage: StageSpec) -> JobSpec:
    """The effective spec of one stage: the job's sections with the stage's ``set`` merged in."""
    base = spec.model_dump(mode="python", exclude={"stages"})
    merged = deep_merge(base, stage.set)
    if "method" in stage.set:  # a method's settings belong to that method: the stage's method replaces the job's
        merged["method"] = copy.deepcopy(stage.set["method"])
    return JobSpec.model_validate(merged)


def stages_of(spec: JobSpec) -> list[StageSpec]:
    """The stages to run; a job without stages is one stage named 'main'."""
    return list(spec.stages) or [StageSpec(name="main")]
