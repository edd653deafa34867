"""Finding a split's manifest: a URL/folder, or a builtin dataset built on first use into a local cache."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

from .errors import DataError
from .manifest import Manifest, read_manifest

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin://"
CACHE_ENV = "KD_CLUSTER_CACHE"



def _mnist5k(out: str) -> object:
    from .writer import build_mnist5k  # the writer (webdataset, hence torch) only when a set is built

    return build_mnist5k(out, progress=False)


# name -> (cache folder name; bump the version when the builder's output changes, builder(out_url))
_BUILTINS: dict[str, tuple[str, Callable[[str], object]]] = {
    "mnist5k": ("mnist5k-v1", _mnist5k),
}
_BUILTIN_SPLITS = ("train", "val")


def builtin_names() -> list[str]:
    """Names of the builtin datasets, usable as ``builtin://<name>/<split>``."""
    return sorted(_BUILTINS)


def is_builtin(url: str) -> bool:
    """True when ``url`` has the ``builtin://`` form."""
    return url.startswith(BUILTIN_PREFIX)


def cache_dir() -> str:
    """The local folder builtin datasets are built into: ``$KD_CLUSTER_CACHE`` or ``~/.cache/kd_cluster``."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/kd_cluster"))


def _builtin_manifest_url(url: str) -> str:
    parts = url[len(BUILTIN_PREFIX) :].strip("/").split("/")
    if len(parts) != 2 or parts[0] not in _BUILTINS or parts[1] not in _BUILTIN_SPLITS:
        raise DataError(
            f"unknown builtin dataset {url!r}: expected builtin://<name>/<split> with name in "
            f"{builtin_names()} and split in {list(_BUILTIN_SPLITS)}"
        )
    name, split = parts
    folder_name, build = _BUILTINS[name]
    final = os.path.join(cache_dir(), folder_name)
    if not os.path.exists(os.path.join(final, split, "manifest.json")):
        os.makedirs(cache_dir(), exist_ok=True)
        # Build into a private folder, then publish it with one atomic rename: concurrent processes may
        # both build, exactly one rename wins, and nobody ever sees a half-written dataset.
        tmp = os.path.join(cache_dir(), f".{folder_name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        log.info("building builtin dataset %s into %s", name, final)
        try:
            build(tmp)
            with contextlib.suppress(OSError):  # another process published first: keep theirs
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(final, split, "manifest.json")


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Load the manifest of a split, with every shard URL absolute.

    ``url`` is a manifest file (local path, ``file://``, ``s3://``, any fsspec URL), a folder holding
    ``manifest.json``, or ``builtin://<name>/<split>`` (e.g. ``builtin://mnist5k/train``), which is
    built on first use into :func:`cache_dir`. A missing or malformed manifest raises
    :class:`DataError` naming the URL.
    """
    if is_builtin(url):
        return read_manifest(_builtin_manifest_url(url))
    return read_manifest(url, storage_options)
