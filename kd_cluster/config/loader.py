"""Load a job file: safe YAML, ``extends:`` bases, profiles, dotted command-line overrides, typed validation; all
of them combine by one rule, :func:`merge`.

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


MAX_BYTES = 1 << 20
"""The largest job file read (1 MiB; real ones are a few KiB)."""
MAX_DEPTH = 32
"""The deepest nesting of mappings and lists a job file may have (real ones use about 5 levels)."""


MAX_NODES = 100_000
"""The most values a job file may hold once its YAML aliases (``*name``) are expanded."""


class _Cycle(Exception):
    """A YAML alias inside the collection its anchor names: the loaded value would contain itself."""


def _shape(text: str) -> tuple[int, int]:
    """(nesting depth, number of values) of the YAML in ``text`` with its aliases expanded, from the parser's
    event stream: no recursion and nothing built, so neither a deep file nor aliases that multiply (a "billion
    laughs" file) cost more than reading it. Stops counting once a limit is passed."""
    stack: list[list[Any]] = [[None, 0, 0]]  # per open collection: anchor, values in it, height below it
    anchors: dict[str, tuple[int, int]] = {}
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([event.anchor, 1, 0])
            if len(stack) - 1 > MAX_DEPTH:
                return len(stack) - 1, stack[0][1]
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size, height = stack.pop()
            node = (size, height + 1)
            if anchor:
                anchors[anchor] = node
        elif isinstance(event, yaml.ScalarEvent):
            node = (1, 0)
            if event.anchor:
                anchors[event.anchor] = node
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[0] == event.anchor for frame in stack):
                raise _Cycle(event.anchor)
            node = anchors.get(event.anchor, (1, 0))
        else:
            continue
        top = stack[-1]
        top[1] += node[0]
        top[2] = max(top[2], node[1])
        if len(stack) - 1 + node[1] > MAX_DEPTH or sum(f[1] for f in stack) > MAX_NODES:
            return len(stack) - 1 + node[1], sum(f[1] for f in stack)
    return stack[0][2], stack[0][1]


def _non_string_key(data: Any, where: str = "") -> str | None:
    """The dotted place of the first mapping key that is not a string (YAML reads ``1:``, ``true:`` and ``~:``
    as a number, a boolean and null), or None."""
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(k, str):
                return f"{where or 'top level'}: key {k!r} is a {type(k).__name__}, keys must be names"
            inner = _non_string_key(v, f"{where}.{k}" if where else k)
            if inner:
                return inner
    elif isinstance(data, list):
        for i, v in enumerate(data):
            inner = _non_string_key(v, f"{where}[{i}]")
            if inner:
                return inner
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), ["file not found"])
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SpecError(str(path), [f"the file has {size} bytes; a job file may have at most {MAX_BYTES}"])
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(str(path), [f"cannot be read ({exc.strerror or exc})"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(str(path), [f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} "
                                    "(save the file as UTF-8)"]) from None
    try:
        depth, values = _shape(text)
        if depth > MAX_DEPTH:
            raise SpecError(str(path), [f"nested more than {MAX_DEPTH} levels deep; job sections nest a few levels"])
        if values > MAX_NODES:
            raise SpecError(str(path), [f"holds more than {MAX_NODES} values once its aliases (*name) are expanded"])
        data = yaml.safe_load(text)
    except SpecError:
        raise
    except _Cycle as exc:
        raise SpecError(str(path), [f"the YAML anchor &{exc} contains itself (*{exc} inside it); a job file must "
                                    "be a tree: copy the values instead"]) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise SpecError(str(path), [f"not valid YAML: {detail}"]) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a date like 2026-13-45
        raise SpecError(str(path), [f"not valid YAML: a value cannot be read ({type(exc).__name__}: {exc})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(str(path), [f"the top level must be a mapping, got {type(data).__name__}"])
    bad_key = _non_string_key(data)
    if bad_key:
        raise SpecError(str(path), [bad_key])
    return data


def merge(base: Any, over: Any, where: str = "") -> Any:
    """The one rule by which settings combine, wherever they come from: a file over the files it ``extends:``, a
    profile over its job, a stage's ``set:`` over the job's sections, a command-line override over the job.

    - Mappings merge key by key, recursively; anything else in ``over`` (a value, a list) replaces.
    - A ``method:`` mapping that names another method (``name:``) replaces the method it lands on: a method's
      settings belong to that method. One that names the same method, or none, merges into it like any mapping
      (so ``method.ce_weight=1.0`` on the command line reaches every stage that trains with the job's method).
    - A mapping that lands on a list of named entries (``stages``) merges into the entries it names:
      ``stages: {student: {set: ...}}`` changes that one stage; a name the list does not hold is an error.

    ``base`` and ``over`` are not changed; the result shares nothing with them.
    """
    if isinstance(over, dict) and isinstance(base, list) and all(isinstance(e, dict) and "name" in e for e in base):
        names = [e["name"] for e in base]
        unknown = [k for k in over if k not in names]
        if unknown:
            raise SpecError(where or "top level", [f"{where}.{unknown[0]}: no entry named {unknown[0]!r}; entries: "
                                                   f"{', '.join(map(str, names))}"])
        return [merge(e, over[e["name"]], f"{where}.{e['name']}") if e["name"] in over else copy.deepcopy(e)
                for e in base]
    if not (isinstance(over, dict) and isinstance(base, dict)):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        replaces = (k == "method" and isinstance(v, dict) and isinstance(out.get(k), dict)
                    and v.get("name") not in (None, out[k].get("name")))
        out[k] = copy.deepcopy(v) if replaces or k not in out else merge(out[k], v, f"{where}.{k}" if where else k)
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
        merged = merge(merged, load_raw(p.parent / b, (*_seen, p)))
    return merge(merged, data)


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


def override_mapping(text: str) -> dict[str, Any]:
    """``a.b.c=value`` as the mapping ``{a: {b: {c: value}}}`` that :func:`merge` puts over the job; a stage is
    addressed by its name (``stages.<name>.set.<section>.<field>=value``)."""
    parts, value = parse_override(text)
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Command-line overrides merged over a raw job, in order (:func:`merge`)."""
    for text in overrides:
        try:
            data = merge(data, override_mapping(text))
        except SpecError as exc:
            raise SpecError("command line", [f"override {text!r}: {p}" for p in exc.problems]) from None
    return data


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
    return merge(data, profiles[profile])


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None, profile: str | None = None) -> JobSpec:
    """Load, merge ``extends:``, apply a profile, apply overrides and validate a job file."""
    data = apply_profile(load_raw(path), profile, str(path))
    data = apply_overrides(data, overrides or [])
    return validate_spec(data, str(path))


def stage_spec(spec: JobSpec, stage: StageSpec) -> JobSpec:
    """The effective spec of one stage: the job's sections with the stage's ``set`` merged in (:func:`merge`)."""
    return JobSpec.model_validate(merge(spec.model_dump(mode="python", exclude={"stages"}), stage.set))


def with_settings(spec: JobSpec, changes: dict[str, Any]) -> JobSpec:
    """``spec`` with ``changes`` (a partial job, e.g. ``{"resources": {"num_workers": 1}}``) merged in by
    :func:`merge` and validated again: how code changes a validated spec, so that the result is always one a job
    file could have said."""
    return JobSpec.model_validate(merge(spec.model_dump(mode="python"), changes))


def stages_of(spec: JobSpec) -> list[StageSpec]:
    """The stages to run; a job without stages is one stage named 'main'."""
    return list(spec.stages) or [StageSpec(name="main")]
