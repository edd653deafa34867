"""Finding a split's manifest: a URL/folder, or a builtin dataset built on first use into a local cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

from .errors import DataError, DatasetMissing
from .manifest import Manifest, read_manifest

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin://"
CACHE_ENV = "KD_CLUSTER_CACHE"
FASHION_MNIST_ENV = "KD_CLUSTER_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HOLDOUT_DIVISOR = 12
"""The last twelfth of the training images (5,000 of Fashion-MNIST's 60,000) form builtin://fashion-mnist/val."""
FASHION_MNIST_FEW = 500
"""builtin://fashion-mnist/train500: the first 500 images of the train split (about 50 per class), the student's
data in the benchmark's limited-data regime (a teacher trained on all of train, a student with few labels)."""


def _mnist5k(out: str) -> object:
    from .writer import build_mnist5k  # the writer (webdataset, hence torch) only when a set is built

    return build_mnist5k(out, progress=False)


def fashion_mnist_dir() -> str:
    """Where the Fashion-MNIST IDX files are read from: ``$KD_CLUSTER_FASHION_MNIST`` or Debian's folder."""
    return os.path.abspath(os.path.expanduser(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR))


_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _check_fashion_mnist() -> None:
    """One-line error naming the package and the variable when the IDX files are not there (before building)."""
    root = fashion_mnist_dir()
    missing = [n for n in _IDX_NAMES if not any(os.path.isfile(os.path.join(root, n + ext)) for ext in (".gz", ""))]
    if missing:
        raise DatasetMissing(
            f"builtin://fashion-mnist: the Fashion-MNIST IDX files are not in {root} (missing {', '.join(missing)}); "
            f"install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set {FASHION_MNIST_ENV} "
            "to a folder holding them"
        )


def _fashion_mnist_folder() -> str:
    # keyed by the source folder too: a set built from $KD_CLUSTER_FASHION_MNIST never stands in for another
    digest = hashlib.sha1(fashion_mnist_dir().encode()).hexdigest()[:10]
    return f"fashion-mnist-v2-{digest}"  # v2: the train500 split


def _fashion_mnist(out: str) -> object:
    from .writer import FASHION_MNIST_CLASSES, build_idx, find_idx_files, load_idx_pair

    root = fashion_mnist_dir()
    n_train = len(load_idx_pair(*find_idx_files(root)["train"])[1])
    holdout = n_train // FASHION_MNIST_HOLDOUT_DIVISOR
    # a smaller IDX set in $KD_CLUSTER_FASHION_MNIST (a test fixture) gets all of its train split as train500
    few = min(FASHION_MNIST_FEW, n_train - holdout)
    return build_idx(root, out, holdout=holdout, name="fashion-mnist", classes=FASHION_MNIST_CLASSES,
                     progress=False, heads={f"train{FASHION_MNIST_FEW}": few})


# name -> (cache folder name; bump the version when the builder's output changes, builder(out_url), splits,
# a check run before building that raises a one-line DataError when the source is missing, or None)
_BUILTINS: dict[str, tuple[str | Callable[[], str], Callable[[str], object], tuple[str, ...],
                           Callable[[], None] | None]] = {
    "mnist5k": ("mnist5k-v1", _mnist5k, ("train", "val"), None),
    # train: the first 55,000 training images; val: the last 5,000 (for choosing settings); test: t10k;
    # train500: the first 500 of train (the limited-data regime of `bench fidelity --train-split train500`)
    "fashion-mnist": (_fashion_mnist_folder, _fashion_mnist, ("train", "val", "test", f"train{FASHION_MNIST_FEW}"),
                      _check_fashion_mnist),
}


def builtin_names() -> list[str]:
    """Names of the builtin datasets, usable as ``builtin://<name>/<split>``."""
    return sorted(_BUILTINS)


def is_builtin(url: str) -> bool:
    """True when ``url`` has the ``builtin://`` form."""
    return url.startswith(BUILTIN_PREFIX)


def cache_dir() -> str:
    """The local folder builtin datasets are built into: ``$KD_CLUSTER_CACHE`` or ``~/.cache/kd_cluster``."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/kd_cluster"))


def check_builtin(url: str) -> None:
    """Without building anything: raise :class:`DatasetMissing` when ``url`` is a builtin set that is not built
    yet and whose source files are not on this machine (other problems surface when it is opened)."""
    parts = url[len(BUILTIN_PREFIX):].strip("/").split("/")
    if len(parts) != 2 or parts[0] not in _BUILTINS:
        return
    folder, _, _, check = _BUILTINS[parts[0]]
    built = os.path.exists(os.path.join(cache_dir(), folder() if callable(folder) else folder, parts[1], "manifest.json"))
    if check is not None and not built:
        check()


def _builtin_manifest_url(url: str) -> str:
    parts = url[len(BUILTIN_PREFIX) :].strip("/").split("/")
    if len(parts) != 2 or parts[0] not in _BUILTINS or parts[1] not in _BUILTINS[parts[0]][2]:
        splits = {n: list(b[2]) for n, b in _BUILTINS.items()}
        raise DataError(
            f"unknown builtin dataset {url!r}: expected builtin://<name>/<split>, one of {splits}"
        )
    name, split = parts
    folder, build, _, check = _BUILTINS[name]
    folder_name = folder() if callable(folder) else folder
    final = os.path.join(cache_dir(), folder_name)
    if not os.path.exists(os.path.join(final, split, "manifest.json")):
        if check is not None:
            check()
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
    ``manifest.json``, or ``builtin://<name>/<split>`` (e.g. ``builtin://mnist5k/train``,
    ``builtin://fashion-mnist/test``), which is built on first use into :func:`cache_dir`. A missing or malformed manifest raises
    :class:`DataError` naming the URL.
    """
    if is_builtin(url):
        return read_manifest(_builtin_manifest_url(url))
    return read_manifest(url, storage_options)
