"""The FASTA parser's two fast paths -- the C accelerator (``_fastscan.c``) and the numpy path used where
it could not be built -- agree with each other on damaged real files (test_fasta.py runs every layout
and error case through both)."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from prott5nv import fasta
from prott5nv.data import fastscan
from prott5nv.errors import FastaFormatError, InputFileError, InvalidSequenceError
from prott5nv.fasta import FastaReader
from prott5nv.sequence import SequencePolicy


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_the_c_accelerator_is_built() -> None:
    # setup.py builds it whenever a C compiler is present (CI has one): losing it would halve the speed
    from prott5nv import _fastscan  # noqa: F401


def test_c_and_numpy_paths_agree_on_mutated_files(real_proteins, tmp_path: Path, monkeypatch) -> None:
    """Real records with random damage (CR, blanks, '*', gaps, '>', control bytes, lower case, blank
    lines, empty bodies), under every policy, skipping or stopping at bad records: the C accelerator
    and the numpy path give the same records, lines, descriptions, skip messages and errors."""
    rng = random.Random(0)
    outcomes = {"clean": 0, "skipped": 0, "error": 0}
    base = "".join(f">{rid} some description\n{seq[:70]}\n{seq[70:140]}\n" for rid, seq in real_proteins)
    damage = ["\r", " ", "\t", "*", "-", ".", ">", "\x01", "\n", "\n\n", "j", "x", ";", "\n>", "\n>\n"]
    for trial in range(150):
        text = list(base)
        for _ in range(rng.randint(0, 4)):
            text.insert(rng.randrange(len(text)), rng.choice(damage))
        path = write(tmp_path / f"m{trial}.fasta", "".join(text).lower() if trial % 7 == 0 else "".join(text))
        policy = SequencePolicy(strip_gaps=trial % 3 == 1, unknown_to_x=trial % 4 == 2)

        def parse(path=path, policy=policy, trial=trial) -> tuple:
            reader = FastaReader(path, policy, skip_invalid=trial % 2 == 0)
            try:
                got = [(r.id, r.sequence, r.description, r.line) for r in reader]
            except (FastaFormatError, InvalidSequenceError) as exc:  # the same message, naming the line
                return ("error", str(exc))
            return got, reader.skipped, reader.skipped_messages

        with_c = parse()
        monkeypatch.setattr(fastscan, "_fastscan", None)
        assert parse() == with_c, trial
        monkeypatch.undo()
        outcomes["error" if with_c[0] == "error" else "skipped" if with_c[1] else "clean"] += 1
    assert min(outcomes.values()) >= 5, outcomes  # the damage reaches every outcome


@pytest.mark.parametrize("inflate", ["isal", "zlib"])
def test_gzip_with_either_inflater(swissprot_2k: Path, tmp_path: Path, monkeypatch, inflate: str) -> None:
    """gzip input reads the same through ISA-L (the `isal` extra, installed with the test extras) and
    through the standard library; truncated or damaged data is a clear error naming the file."""
    if inflate == "zlib":
        monkeypatch.setattr(fastscan, "_igzip", None)
    else:
        from isal import igzip  # noqa: F401 - the test extras install it: fail if they did not

    raw = swissprot_2k.read_bytes()
    packed = gzip.compress(raw)
    plain = [(r.id, r.sequence, r.line) for r in fasta.read_fasta(swissprot_2k)]
    assert [(r.id, r.sequence, r.line) for r in fasta.read_fasta(write(tmp_path / "a.gz", packed))] == plain
    damaged = bytearray(packed)
    damaged[len(packed) // 2 : len(packed) // 2 + 64] = bytes(64)
    for name, data in (("truncated.gz", packed[: len(packed) // 2]), ("damaged.gz", bytes(damaged))):
        with pytest.raises(InputFileError, match=rf"{name}:\d+: cannot read past this line: truncated or damaged"):
            list(fasta.read_fasta(write(tmp_path / name, data)))
