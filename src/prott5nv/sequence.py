"""The residue alphabet and the input policy of docs/inputs.md, applied to one raw sequence string.

Owned here so that FASTA reading, the tokenizer, the API and the server all clean sequences the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidSequenceError

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
#: The 25 letters every vocabulary accepts: 20 standard + X (unknown) B (D/N) Z (E/Q) U (Sec) O (Pyl).
RESIDUES = STANDARD_RESIDUES + "XBZUO"
_RESIDUE_SET = frozenset(RESIDUES)
_GAPS = frozenset("-.")
_WHITESPACE = " \t\r\n\v\f"
# Upper-case ASCII letters only: str.upper() would turn "ı" into "I" and "ß" into "SS", valid residues.
_UPPER = {ord(c): ord(c.upper()) for c in "abcdefghijklmnopqrstuvwxyz"} | {ord(c): None for c in _WHITESPACE}


@dataclass(frozen=True)
class SequencePolicy:
    """How lenient to be with a raw sequence (the CLI flags `--strip-gaps` and `--unknown-to-x`)."""

    strip_gaps: bool = False
    unknown_to_x: bool = False


DEFAULT_POLICY = SequencePolicy()


def location(record_id: str | None, source: str | None = None, line: int | None = None) -> str:
    """Where a record is, as every message names it: ``FILE:LINE, record 'ID'`` (the parts known)."""
    parts = []
    if source:
        parts.append(f"{source}:{line}" if line else source)
    if record_id is not None:
        parts.append(f"record '{record_id}'")
    return ", ".join(parts)


def clean_sequence(
    raw: str,
    record_id: str | None = None,
    policy: SequencePolicy = DEFAULT_POLICY,
    *,
    source: str | None = None,
    line: int | None = None,
    offset: int = 0,
    final_stop: bool = True,
) -> str:
    """Return `raw` upper-cased with whitespace removed, a single trailing `*` dropped, and every letter
    checked against the 25-letter alphabet. Raises :class:`InvalidSequenceError` naming the record, the
    position (1-based, in the cleaned sequence) and the character otherwise.

    For a part of a protein (the residues between masks of a masked protein): `offset` residues come
    before it (positions are the protein's), and `final_stop=False` keeps a final `*` (an error there).
    """
    seq = raw.translate(_UPPER)
    if final_stop and seq.endswith("*"):
        seq = seq[:-1]
    if policy.strip_gaps:
        seq = seq.replace("-", "").replace(".", "")
    where = location(record_id, source, line)
    prefix = f"{where}: " if where else ""
    if not seq:
        raise InvalidSequenceError(f"{prefix}empty sequence", record=record_id)
    if not _RESIDUE_SET.issuperset(seq):
        chars = list(seq)
        for i, ch in enumerate(chars):
            if ch in _RESIDUE_SET:
                continue
            if policy.unknown_to_x and ch.isascii() and ch.isalpha():
                chars[i] = "X"
                continue
            if ch == "*":
                problem = "stop symbol '*' inside the sequence (only a single trailing '*' is allowed)"
            elif ch in _GAPS:
                problem = f"alignment gap '{ch}' (use --strip-gaps to remove gaps)"
            elif ch.isascii() and ch.isalpha():
                problem = f"unknown residue '{ch}' (use --unknown-to-x to map unknown letters to X)"
            else:
                problem = f"invalid character {ch!r}"
            at = offset + i + 1
            raise InvalidSequenceError(f"{prefix}{problem} at position {at}", record=record_id, position=at)
        seq = "".join(chars)
    return seq
