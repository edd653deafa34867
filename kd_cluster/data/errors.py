"""The exception types of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem: a missing or malformed manifest, an impossible split, bad parameters.

    The message always names the URL or folder concerned and what is wrong with it.
    """


class DatasetMissing(DataError):
    """A builtin dataset whose source files are not on this machine: nothing can run on it, so the planner
    stops at once with this one line (naming what to install) instead of listing it among the spec's problems."""
