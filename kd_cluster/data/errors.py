"""The one exception type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem: a missing or malformed manifest, an impossible split, bad parameters.

    The message always names the URL or folder concerned and what is wrong with it.
    """
