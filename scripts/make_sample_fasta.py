"""Write examples/sample.fasta: 48 real UniProtKB/Swiss-Prot proteins (30-500 residues) taken in file
order from ../shared/data/swissprot_dev_100k.fasta.gz (CC BY 4.0, UniProt Consortium)."""

from __future__ import annotations

import sys
from pathlib import Path

from prott5nv.fasta import read_fasta, write_fasta

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/swissprot_dev_100k.fasta.gz")
out = Path(__file__).resolve().parents[1] / "examples" / "sample.fasta"
picked = []
for rec in read_fasta(src):
    if 30 <= len(rec.sequence) <= 500:
        picked.append((rec.id, rec.sequence))
    if len(picked) == 48:
        break
write_fasta(picked, out)
print(f"wrote {len(picked)} proteins to {out}")
