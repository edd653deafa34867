"""The input normalisation a job gets when it sets none (no torch: the planner resolves it)."""

from __future__ import annotations


def default_normalization(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics for RGB, 0.5/0.5 for grayscale."""
    if channels == 3:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [0.5] * channels, [0.5] * channels


__all__ = ["default_normalization"]
