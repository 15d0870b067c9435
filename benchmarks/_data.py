"""Where the benchmarks find real proteins: the Swiss-Prot sample beside the repository
(``../shared/data/swissprot_dev_100k.fasta.gz``, the development layout), else the 3,000-record subset
shipped in ``tests/data``; every benchmark also takes the file as a flag. Paths are relative to this
checkout, never to one machine."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SHIPPED = REPO / "tests" / "data" / "swissprot_3k.fasta.gz"


def swissprot() -> Path:
    """The largest real Swiss-Prot FASTA at hand (see the module docstring)."""
    full = SHARED / "swissprot_dev_100k.fasta.gz"
    return full if full.exists() else SHIPPED
