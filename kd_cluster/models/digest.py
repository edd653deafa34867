"""The digest of a weights file, read without torch (the planner checks a label set's teacher with it)."""

from __future__ import annotations

from typing import Any

import fsspec


def weights_sha256(uri: str, *, storage_options: dict[str, Any] | None = None) -> str | None:
    """SHA-256 of a weights file's bytes (what a label set records of the teacher); None when it cannot be read."""
    import hashlib

    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except (OSError, ValueError):
        return None
    except Exception as exc:  # noqa: BLE001 - object-store clients raise their own types
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs"):
            return None
        raise
    return h.hexdigest()


__all__ = ["weights_sha256"]
