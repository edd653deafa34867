"""Locations, one meaning each: a *location* is a local path or a URL (``s3://bucket/key``, ``gs://...``, any
fsspec protocol, ``builtin://fashion-mnist/train``); ``file://`` URLs are local paths.

Every layer resolves locations with these functions (no other module does URL arithmetic), so that a path a
user wrote means the same thing to the data stream, the checkpoint store and the run records:

- :func:`is_remote`: it has a scheme other than ``file://`` (``builtin://`` included: the data catalog builds
  those sets, they are never opened as a path);
- :func:`absolute`: a local path made absolute (``~`` expanded, ``..`` removed, symlinks kept: workers may run in
  another directory, and nothing on disk is asked); a remote URL as it is;
- :func:`join`: path segments appended with ``/`` (never a segment that starts over at ``/``);
- :func:`parent`, :func:`name` and :func:`resolve` (a reference relative to a folder, e.g. a shard named in its manifest).
"""

from __future__ import annotations

import os

LOCAL_SCHEME = "file://"


def has_scheme(url: str) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain path."""
    return "://" in url


def is_remote(url: str) -> bool:
    """True for a URL whose scheme is not ``file://``; False for local paths and ``file://`` URLs."""
    return has_scheme(url) and not url.startswith(LOCAL_SCHEME)


def absolute(url: str) -> str:
    """A local path (or ``file://`` URL) as an absolute path; a remote URL unchanged."""
    if is_remote(url):
        return url
    return os.path.abspath(os.path.expanduser(url.removeprefix(LOCAL_SCHEME)))


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended, ``/``-separated, whatever its scheme."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(url: str) -> str:
    """The folder that holds ``url``."""
    return url.rstrip("/").rsplit("/", 1)[0]


def name(url: str) -> str:
    """The last segment of ``url`` (a file's or a folder's name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def resolve(base_dir: str, ref: str) -> str:
    """``ref`` as written (a URL or an absolute path), or relative to the folder ``base_dir``."""
    if has_scheme(ref) or ref.startswith("/"):
        return ref
    return join(base_dir, ref)


__all__ = ["LOCAL_SCHEME", "absolute", "has_scheme", "is_remote", "join", "name", "parent", "resolve"]
