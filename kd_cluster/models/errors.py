"""The error type of the models layer."""

from __future__ import annotations


class ModelError(ValueError):
    """A user mistake about a model: an unknown name, a bad feature tap, weights that do not fit.

    The message names the problem and what is allowed instead.
    """
