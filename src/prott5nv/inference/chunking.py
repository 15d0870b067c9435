"""Long proteins cut into overlapping windows whose per-residue outputs are stitched back together.

Windows all have `size` residues (the last one ends at the protein's end) and are spread evenly so that
neighbours overlap by at least `overlap` residues. Each residue is taken from the window in which it is
farthest from an edge (ties: the earlier window), so every residue sees at least ``overlap / 2``
residues of context on both sides wherever the protein allows it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError


def check_chunking(size: int, overlap: int, limit: int | None) -> None:
    """Refuse window settings that cannot work with a model accepting `limit` residues."""
    if size <= 0:
        raise ConfigError(f"--chunk-size must be positive, got {size}")
    if limit is not None and size > limit:
        raise ConfigError(f"--chunk-size {size} exceeds the model's maximum of {limit} residues")
    if not 0 <= overlap < size:
        raise ConfigError(f"--chunk-overlap must be in [0, --chunk-size={size}), got {overlap}")


def chunk_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of the windows covering a protein of `length` residues ([0] when it fits)."""
    if length <= size:
        return [0]
    step = size - overlap
    n = max(2, math.ceil((length - overlap) / step))
    while True:
        starts = [round(k * (length - size) / (n - 1)) for k in range(n)]
        if max(np.diff(starts)) <= step:
            return starts
        n += 1


def owned_spans(length: int, starts: Sequence[int], size: int) -> list[tuple[int, int]]:
    """For each window, the residues ``[lo, hi)`` taken from it: those farthest from its edges. A
    residue's distance to the nearer edge of a window is ``(size - 1) / 2`` less its distance to the
    window's centre, so its owner is the window with the nearest centre (ties: the earlier window); the
    centres increase, so each window owns one run of residues and neighbours meet halfway between their
    centres. O(windows), whatever the length (no residue-by-window table)."""
    if len(starts) == 1:
        return [(0, length)]
    # residue p goes to window k + 1 rather than k when 2p > starts[k] + starts[k + 1] + size - 1
    bounds = [0, *((a + b + size - 1) // 2 + 1 for a, b in zip(starts, starts[1:], strict=False)), length]
    return list(zip(bounds, bounds[1:], strict=False))


def owners(length: int, starts: Sequence[int], size: int) -> np.ndarray:
    """For each residue, the index of the window it is taken from (:func:`owned_spans`, per residue)."""
    spans = owned_spans(length, starts, size)
    return np.repeat(np.arange(len(spans)), [hi - lo for lo, hi in spans])


def stitch(pieces: Sequence[np.ndarray], starts: Sequence[int], length: int) -> np.ndarray:
    """Per-residue outputs ``[length, ...]`` of a protein from its windows' outputs ``[size_k, ...]``
    (``[size_k, D]``, or ``[size_k, layers, D]``)."""
    if len(pieces) == 1:
        return pieces[0]
    out = np.empty((length, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
    for piece, start, (lo, hi) in zip(pieces, starts, owned_spans(length, starts, len(pieces[0])), strict=True):
        out[lo:hi] = piece[lo - start : hi - start]
    return out
