"""Small shared helpers: fsspec access, atomic writes through fsspec, and seeded generators (URL arithmetic is
:mod:`kd_cluster.urls`)."""

from __future__ import annotations

import contextlib
import enum
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile


def url_to_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with optional storage options."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


@contextlib.contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open ``path`` for binary writing so that readers see either nothing or the complete file.

    Local files are written under a temporary name and renamed into place (``fs.mv``). Object-store
    files (fsspec buffered files: s3, gcs, azure) become visible only when the upload completes on
    close (a single PUT or a completed multipart upload), so they are written in place; a failed write
    is discarded (multipart upload aborted) instead of being committed half-way.
    """
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with fs.open(tmp, "wb") as f:
                yield f
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(tmp)
            raise
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        if isinstance(f, AbstractBufferedFile):
            f.discard()
            f.closed = True  # skip the flush-on-close that would commit a partial object
        else:
            f.close()
            with contextlib.suppress(Exception):
                fs.rm(path)
        raise
    f.close()


class SeedTag(enum.IntEnum):
    """Domain separation for every seeded generator of the data layer."""

    SHARD_PERMUTATION = 1
    SAMPLE_PERMUTATION = 2
    AUGMENT = 3
    MIXUP = 4
    IMAGEFOLDER_SHUFFLE = 5
    MNIST_SPLIT = 6
    SOFT_LABEL_PICK = 7


def seeded_rng(tag: SeedTag, *parts: int) -> np.random.Generator:
    """A numpy Generator that is a pure function of ``(tag, *parts)``.

    Every part is encoded as exactly two 32-bit words (negative ints wrap modulo 2**64), so
    different tuples never alias the way variable-length SeedSequence entropy can.
    """
    words: list[int] = []
    for p in (int(tag), *parts):
        v = int(p) % (1 << 64)
        words += (v & 0xFFFFFFFF, v >> 32)
    return np.random.default_rng(np.random.SeedSequence(np.array(words, dtype=np.uint32)))
