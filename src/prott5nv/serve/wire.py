"""How arrays travel in requests and responses: JSON lists, or base64 float32 with a shape (compact).

Numpy only, so the client (:mod:`prott5nv.client`) can decode responses without the server's packages.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

ENCODINGS = ("json", "base64")


def encode_array(array: np.ndarray, encoding: str = "json") -> Any:
    """A float array as a JSON list, or as ``{"dtype": "float32", "shape": [...], "data": base64 of the
    little-endian bytes}``."""
    if encoding == "json":
        return array.tolist()
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(value: Any) -> np.ndarray:
    """Inverse of :func:`encode_array` for either encoding (native float32)."""
    if isinstance(value, dict):
        raw = base64.b64decode(value["data"])
        return np.frombuffer(raw, dtype="<f4").reshape(value["shape"]).astype(np.float32)
    return np.asarray(value, dtype=np.float32)
