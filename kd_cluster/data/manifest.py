"""The manifest of one split: what the shards are, where they live, how many samples each holds.

On disk (``<out>/<split>/manifest.json``) shard URLs are stored relative to the manifest so the folder
can be moved or copied (local -> s3) as it is; in memory they are absolute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ._util import atomic_write, url_to_fs
from kd_cluster.urls import absolute, parent, resolve
from .errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "kd_cluster.shards/1"


@dataclass(frozen=True)
class ShardInfo:
    """One WebDataset tar of a split."""

    url: str
    """Absolute URL or absolute local path of the ``.tar``."""
    count: int
    """Number of samples the writer put in it."""
    first_index: int
    """Stable index of its first sample."""


@dataclass(frozen=True)
class Manifest:
    """A split of a sharded dataset."""

    url: str
    """Where the manifest itself lives."""
    name: str
    """Dataset name, e.g. ``"mnist5k"``."""
    split: str
    """``"train"`` or ``"val"``."""
    classes: list[str]
    """Class names; a label is an index into this list."""
    channels: int
    """1 (grayscale) or 3 (RGB)."""
    num_samples: int
    """Total samples over all shards."""
    shards: list[ShardInfo]
    """The shards, in writing order (their stable indices are contiguous and increasing)."""
    reencode: dict[str, int] | None = None
    """How the writer shrank large images (``max_side``, ``quality``, ``reencoded``: how many); None: bytes as given."""

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        """The on-disk form, with shard URLs relative to the manifest's folder where possible."""
        base = parent(self.url) + "/"
        return {
            "format": FORMAT,
            "name": self.name,
            "split": self.split,
            "classes": list(self.classes),
            "channels": self.channels,
            "num_samples": self.num_samples,
            "shards": [
                {
                    "url": s.url[len(base) :] if s.url.startswith(base) else s.url,
                    "count": s.count,
                    "first_index": s.first_index,
                }
                for s in self.shards
            ],
        } | ({"reencode": dict(self.reencode)} if self.reencode is not None else {})


def manifest_from_json(url: str, doc: Any) -> Manifest:
    """Validate a parsed manifest document and resolve its shard URLs against ``url``'s folder."""

    def bad(what: str) -> DataError:
        return DataError(f"malformed manifest {url}: {what}")

    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if doc.get("format", FORMAT) != FORMAT:
        raise bad(f"format {doc.get('format')!r} is not {FORMAT!r}")
    fields = {"name": str, "split": str, "classes": list, "channels": int, "num_samples": int, "shards": list}
    for key, typ in fields.items():
        if key not in doc:
            raise bad(f"missing field {key!r}")
        if not isinstance(doc[key], typ) or isinstance(doc[key], bool):
            raise bad(f"field {key!r} must be a {typ.__name__}, got {type(doc[key]).__name__}")
    if doc["channels"] not in (1, 3):
        raise bad(f"channels must be 1 or 3, got {doc['channels']}")
    if not doc["classes"] or not all(isinstance(c, str) for c in doc["classes"]):
        raise bad("classes must be a non-empty list of strings")
    if not doc["shards"]:
        raise bad("no shards")
    base = parent(url)
    shards = []
    for i, s in enumerate(doc["shards"]):
        if not (
            isinstance(s, dict)
            and isinstance(s.get("url"), str)
            and isinstance(s.get("count"), int)
            and isinstance(s.get("first_index"), int)
            and s["count"] >= 0
        ):
            raise bad(f"shard entry {i} must be {{'url': str, 'count': int >= 0, 'first_index': int}}, got {s!r}")
        shards.append(ShardInfo(url=resolve(base, s["url"]), count=s["count"], first_index=s["first_index"]))
    reencode = doc.get("reencode")
    if reencode is not None and not (isinstance(reencode, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in reencode.items())):
        raise bad(f"reencode must be an object of integers (max_side, quality, reencoded), got {reencode!r}")
    total = sum(s.count for s in shards)
    if total != doc["num_samples"]:
        raise bad(f"num_samples is {doc['num_samples']} but the shard counts add up to {total}")
    return Manifest(
        url=url,
        name=doc["name"],
        split=doc["split"],
        classes=list(doc["classes"]),
        channels=doc["channels"],
        num_samples=total,
        shards=shards,
        reencode=dict(reencode) if reencode is not None else None,
    )


def manifest_file_url(url: str) -> str:
    """The manifest file for ``url``: ``url`` itself if it names a ``.json`` file, else ``url/manifest.json``."""
    url = absolute(url)
    if url.endswith(".json"):
        return url
    return url.rstrip("/") + "/" + MANIFEST_NAME


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and validate a manifest file or folder (no builtin names; see :func:`load_manifest`)."""
    file_url = manifest_file_url(url)
    fs, path = url_to_fs(file_url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        where = url if url == file_url else f"{url} (looked for {file_url})"
        raise DataError(f"manifest not found: {where}") from None
    except IsADirectoryError:
        raise DataError(f"manifest {file_url} is a folder, expected a JSON file") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"malformed manifest {file_url}: not valid JSON ({e})") from None
    return manifest_from_json(file_url, doc)


def write_manifest(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``manifest`` to ``manifest.url`` atomically."""
    fs, path = url_to_fs(manifest.url, storage_options)
    data = json.dumps(manifest.to_json(), indent=1).encode()
    with atomic_write(fs, path) as f:
        f.write(data)


__all__ = ["MANIFEST_NAME", "Manifest", "ShardInfo", "read_manifest", "write_manifest"]
