"""How many pixels a chunk holds: every pass over a map (evaluation, heatmaps, boundary
classes, the temperature fit) reads it chunk by chunk, in bounded memory."""

from __future__ import annotations

from ..errors import UsageError

DEFAULT_CHUNK_PIXELS = 1 << 15
"""Pixels per chunk: 32768 × 19 classes × 4 bytes ≈ 2.5 MB, about an L2/L3 cache's worth."""


MAX_CHUNK_ELEMENTS = 1 << 22
"""A chunk never holds more values than this (16 MB of float32), however many classes."""


def chunk_for(chunk_pixels: int, num_classes: int) -> int:
    """Pixels per chunk for a map with ``num_classes`` classes: memory stays bounded."""
    if chunk_pixels < 1:
        raise UsageError(f"chunk size must be positive, got {chunk_pixels}")
    return max(1, min(chunk_pixels, MAX_CHUNK_ELEMENTS // max(num_classes, 1)))
