"""Reading one shard's raw samples (bytes only, no decoding) with webdataset's tar helpers."""

from __future__ import annotations

import logging
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator

from ._util import url_to_fs
from .manifest import ShardInfo

log = logging.getLogger(__name__)

RawSample = dict[str, Any]
"""A grouped tar sample: ``__key__``, ``__url__`` and one ``bytes`` value per extension."""

_READ_BLOCK = 16 << 20  # object stores: 16 MiB ranged GETs while streaming through a shard
_warned: set[str] = set()


def safe_key(key: Any) -> bool:
    """Whether a member name's key is a plain relative name: not absolute and without ``..`` segments.

    Shards are read in memory and their members are never written out under their names; a sample whose
    name tries to climb out of a folder (``../../x``) is still treated as damaged, in case anything ever does.
    """
    if not isinstance(key, str) or not key or key.startswith(("/", "\\")) or "\x00" in key:
        return False
    return ".." not in key.replace("\\", "/").split("/")


def _unsafe(url: str, sample: RawSample) -> None:
    log.warning("shard %s: member %r has an unsafe path (absolute or with '..'); skipped as corrupt", url,
                sample.get("__key__"))
    return None


def read_shard(shard: ShardInfo, storage_options: dict[str, Any] | None = None) -> list[RawSample | None]:
    """All samples of ``shard`` by position (order in the tar), as raw bytes; ``None`` where missing.

    A shard that cannot be opened, ends early, or raises part-way keeps the samples read before the
    problem; the positions its manifest count promises beyond them are ``None`` (counted as corrupt by
    the streams). A warning is logged the first time this process finds a given shard short.
    """
    samples: list[RawSample | None] = []
    problem = ""
    try:
        fs, path = url_to_fs(shard.url, storage_options)
        with fs.open(path, "rb", block_size=_READ_BLOCK) as f:
            files = ({**entry, "__url__": shard.url} for entry in tar_file_iterator(f))
            for sample in group_by_keys(files):
                if len(samples) == shard.count:
                    break
                samples.append(sample if safe_key(sample.get("__key__")) else _unsafe(shard.url, sample))
    except Exception as e:  # a damaged or unreadable shard costs its samples, never the run
        problem = f" ({type(e).__name__}: {e})"
    if len(samples) < shard.count:
        if shard.url not in _warned:
            _warned.add(shard.url)
            log.warning(
                "shard %s is truncated or unreadable: it holds %d of the %d samples its manifest lists%s; "
                "the missing ones are skipped and counted as corrupt",
                shard.url,
                len(samples),
                shard.count,
                problem,
            )
        samples.extend([None] * (shard.count - len(samples)))
    return samples
