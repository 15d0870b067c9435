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


def owners(length: int, starts: Sequence[int], size: int) -> np.ndarray:
    """For each residue, the index of the window it is taken from (farthest from that window's edges)."""
    pos = np.arange(length)[None, :]
    s = np.asarray(starts)[:, None]
    inside = (pos >= s) & (pos < s + size)
    margin = np.where(inside, np.minimum(pos - s, s + size - 1 - pos), -1)
    return margin.argmax(0)  # argmax takes the first maximum: ties go to the earlier window


def stitch(pieces: Sequence[np.ndarray], starts: Sequence[int], length: int) -> np.ndarray:
    """Per-residue outputs ``[length, ...]`` of a protein from its windows' outputs ``[size_k, ...]``
    (``[size_k, D]``, or ``[size_k, layers, D]``)."""
    if len(pieces) == 1:
        return pieces[0]
    size = len(pieces[0])
    own = owners(length, starts, size)
    out = np.empty((length, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
    for k, (piece, start) in enumerate(zip(pieces, starts, strict=True)):
        sel = np.flatnonzero(own == k)
        out[sel] = piece[sel - start]
    return out
