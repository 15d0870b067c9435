"""Read the pieces of a SentencePiece model without the `sentencepiece` package and without running code.

A ``.model`` file is a serialized protobuf ``ModelProto`` whose repeated field 1 holds the pieces, each a
message with ``piece`` (field 1, string), ``score`` (field 2, float) and ``type`` (field 3, enum). We only
need the pieces in id order, so a small wire-format reader is enough. The ``.vocab`` companion file is
plain text, one ``piece<TAB>score`` line per id.
"""

from __future__ import annotations

import struct

from ..errors import CheckpointError

# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """Yield ``(field_number, wire_type, value)``; value is an int or the raw bytes of the field."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield num, wire, value


def parse_model(data: bytes, *, source: str = "<bytes>") -> list[tuple[str, float, int]]:
    """``(piece, score, type)`` for every piece of a SentencePiece ``.model`` file, in id order."""
    pieces = []
    try:
        for num, wire, value in _fields(data):
            if num != 1 or wire != 2:
                continue  # trainer_spec, normalizer_spec, ... are not needed
            piece, score, kind = None, 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            if piece is None:
                raise ValueError("a piece without its text")
            pieces.append((piece, score, kind))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise CheckpointError(f"{source}: not a SentencePiece model (no pieces)")
    return pieces


def parse_vocab(text: str, *, source: str = "<text>") -> list[str]:
    """Pieces of a SentencePiece ``.vocab`` file (``piece<TAB>score`` per line), in id order."""
    pieces = [line.split("\t", 1)[0] for line in text.splitlines() if line.strip()]
    if not pieces:
        raise CheckpointError(f"{source}: empty SentencePiece vocabulary")
    return pieces


def read_pieces(data: bytes, name: str) -> list[str]:
    """Pieces of a ``.model`` (protobuf) or ``.vocab`` (text) file, chosen by the file name."""
    if name.endswith(".vocab"):
        try:
            return parse_vocab(data.decode("utf-8"), source=name)
        except UnicodeDecodeError:
            raise CheckpointError(f"{name}: SentencePiece vocabulary is not UTF-8 text") from None
    return [p for p, _, _ in parse_model(data, source=name)]
