"""The bad-input corpus (issue 16, must-have 2): every command that reads FASTA or a table is given each
kind of bad or merely unusual input, built here from real proteins. Each (case, command) has one expected
outcome, asserted: accepted -- with its result checked against the real records -- or stopped by one
error of the stated class whose one-line message names the file and the line (and the record, where
there is one), before anything is written.

The cases: empty file, binary file, UTF-8 byte-order mark, blank lines before the first record, CRLF line
ends, a NUL byte / a digit / a '*' inside a sequence, a duplicate id, an empty id, a header without a
sequence, a 1 MB header (table: a 1 MB field), gzip data cut short (small file; and past the reader's
first 8 MiB block), a directory, a missing file, a 5,000,000-residue protein. The commands: embed, score,
score-variants (one wild type: the first record of each case), generate and infill (a <mask> in each
protein), preprocess, finetune (FASTA + --labels) and predict on FASTA, finetune and predict on a CSV
table. The output-side cases (an existing output, an unwritable place, ``-o .``, an input given as
output) are asserted for every command in test_output_safety.py.

Every command reads through one reader (prott5nv.fasta; tables through downstream.tasks over the same
file opening), so one cause has one message everywhere; :func:`expected` is the table of outcomes.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TEST_DATA

from prott5nv.cli import build_parser
from prott5nv.cli import main as cli_main
from prott5nv.downstream.tasks import TaskFormatError
from prott5nv.errors import (
    FastaFormatError,
    InputFileError,
    InvalidSequenceError,
    ProtT5nvError,
    SequenceTooLongError,
)

LOCALIZATION = TEST_DATA / "localization_600.csv.gz"
DEMO_BINARY = TEST_DATA.parents[1] / "src" / "prott5nv" / "pretrained" / "prott5nv-demo" / "model.safetensors"
HUGE = 5_000_000  # residues of the long protein
BAD_AT = 10  # 0-based residue of the second record that the nul/digit/star cases replace (position 11)
MASK_AT = 5  # 0-based residue replaced by <mask> in generate/infill inputs

CASES = (
    "empty", "binary", "bom", "blank_lines", "crlf", "nul", "digit", "star", "duplicate_id", "empty_id", "header_only",
    "huge_header", "gzip_cut_small", "gzip_cut_large", "directory", "missing", "huge_protein",
)  # fmt: skip
ACCEPTED = {"bom", "blank_lines", "crlf", "huge_header"}  # read as the plain file is
MANY = {"nul", "digit", "star", "duplicate_id", "empty_id", "header_only"}  # cases about a second record


# ------------------------------------------------------------------------------------------ the inputs
@dataclass
class Corpus:
    root: Path
    records: list[tuple[str, str, str]]  # (id, sequence, location): four real proteins, two classes
    huge: str  # the 5M-residue protein: real Swiss-Prot sequences concatenated
    files: dict[tuple[str, str], Path]  # (case, layout) -> input file

    def file(self, case: str, layout: str) -> Path:
        return self.files[case, layout]


def _fasta(records, layout: str, width: int = 60) -> bytes:
    """FASTA of ``(id, sequence)``; layout "masked": residue MASK_AT written as <mask>."""
    out = []
    for rid, seq in records:
        if layout == "masked" and len(seq) > MASK_AT:
            seq = seq[:MASK_AT] + "<mask>" + seq[MASK_AT + 1 :]
        out.append(f">{rid} real protein\n" + "".join(seq[i : i + width] + "\n" for i in range(0, len(seq), width)))
    return "".join(out).encode()


def _table(rows) -> bytes:
    """CSV ``id,sequence,location,note`` of ``(id, sequence, location[, note])`` rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "sequence", "location", "note"])
    for row in rows:
        w.writerow([*row[:3], row[3] if len(row) > 3 else ""])
    return buf.getvalue().encode()


def _variants(records, case: str, layout: str) -> bytes:
    """The content of `case` in `layout` (fasta, masked, single -- one wild type -- or table)."""
    recs = [(r[0], r[1]) for r in records]
    rows = [tuple(r) for r in records]
    if layout == "single" and case not in MANY:
        recs, rows = recs[:1], rows[:1]
    write = _table if layout == "table" else (lambda rs: _fasta([r[:2] for r in rs], layout))
    base = write(rows if layout == "table" else recs)

    def with_second(seq: str) -> list:
        if layout == "table":
            return [rows[0], (rows[1][0], seq, rows[1][2]), *rows[2:]]
        return [recs[0], (recs[1][0], seq), *recs[2:]]

    second = records[1][1]
    if case in ("nul", "digit", "star"):
        bad = {"nul": "\0", "digit": "7", "star": "*"}[case]
        return write(with_second(second[:BAD_AT] + bad + second[BAD_AT + 1 :]))
    if case == "duplicate_id":
        if layout == "table":
            return write([rows[0], (rows[0][0], *rows[1][1:]), *rows[2:]])
        return write([recs[0], (recs[0][0], recs[1][1]), *recs[2:]])
    if case == "empty_id":
        if layout == "table":
            return write([rows[0], ("", *rows[1][1:]), *rows[2:]])
        return write(recs[:1]) + b">\n" + write(recs[1:2]).split(b"\n", 1)[1] + write(recs[2:])
    if case == "header_only":
        return write(with_second(""))
    if case == "huge_header":  # FASTA: a 1 MB description; table: a 1 MB field
        if layout == "table":
            return write([(*rows[0], "D" * (1 << 20)), *rows[1:]])
        head, rest = write(recs[:1]).split(b"\n", 1)
        return head + b" " + b"D" * (1 << 20) + b"\n" + rest + write(recs[1:])
    return {
        "empty": b"",
        "binary": DEMO_BINARY.read_bytes()[:4096],  # a real binary file: the bundled model's weights
        "bom": b"\xef\xbb\xbf" + base,
        "blank_lines": b"\n\n\n" + base,
        "crlf": base.replace(b"\n", b"\r\n"),
        "gzip_cut_small": (packed := gzip.compress(base))[: len(packed) // 2],
    }[case]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(LOCALIZATION, "rt") as fh:
        table = list(csv.DictReader(fh))
    rows = [r for r in table if 40 <= len(r["sequence"]) <= 200 and r["sequence"][0] == "M"]
    (first, _), (other, _) = Counter(r["location"] for r in table).most_common(2)  # in any predictor's classes
    picked = [next(r for r in rows if r["location"] == first), next(r for r in rows if r["location"] == other)]
    picked += [next(r for r in rows if r["location"] == c and r not in picked) for c in (first, other)]
    records = [(r["id"], r["sequence"], r["location"]) for r in picked]
    from prott5nv.fasta import read_fasta

    real = "".join(r.sequence for r in read_fasta(TEST_DATA / "swissprot_3k.fasta.gz"))
    huge = (real * (HUGE // len(real) + 1))[:HUGE]
    files: dict[tuple[str, str], Path] = {}
    for layout in ("fasta", "masked", "single", "table"):
        suffix = ".csv" if layout == "table" else ".fa"
        for case in CASES:
            path = root / f"{case}.{layout}{suffix}"
            if case == "directory":
                path = root / f"a_directory.{layout}"
                path.mkdir()
            elif case == "huge_protein":
                recs = [*records, ("huge", huge, records[0][2])]
                recs = recs[-1:] if layout == "single" else recs
                path.write_bytes(_table(recs) if layout == "table" else _fasta([r[:2] for r in recs], layout))
            elif case == "gzip_cut_large":  # real records under new ids, past the reader's 8 MiB blocks
                many = [(f"{rid}_{k}", seq, loc) for k in range(15000) for rid, seq, loc in records]
                text = _table(many) if layout == "table" else _fasta([r[:2] for r in many], layout)
                packed = gzip.compress(text, 1)
                path.write_bytes(packed[: int(len(packed) * 0.9)])
            elif case != "missing":
                path.write_bytes(_variants(records, case, layout))
            files[case, layout] = path
    return Corpus(root, records, huge, files)


@pytest.fixture(scope="module")
def predictor_run(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A predictor of the real localization task on the tiny model's embeddings (what predict reads with)."""
    run = tmp_path_factory.mktemp("predictor") / "run"
    assert cli_main(["finetune", str(LOCALIZATION), "-o", str(run), "--model", str(tiny_checkpoint), "--no-cache",
                     "--max-train", "60", "--max-eval", "20", "--max-epochs", "2"]) == 0  # fmt: skip
    return run


# ---------------------------------------------------------------------------------------- the commands
@dataclass(frozen=True)
class Command:
    layout: str  # which variant of each case it reads
    argv: object  # (input, output directory, tiny model, predictor run, labels file) -> argv
    kind: str  # "fasta" (prott5nv.fasta), "task" (FASTA or table: downstream.tasks) or "table"


COMMANDS = {
    "embed": Command("fasta", lambda i, o, m, r, lab: ["embed", i, "-o", f"{o}/e.h5", "--per-residue", "--pooling",
                                                        "mean", "--model", m], "fasta"),
    "score": Command("fasta", lambda i, o, m, r, lab: ["score", i, "-o", f"{o}/s.csv", "--model", m], "fasta"),
    "score-variants": Command("single", lambda i, o, m, r, lab: ["score-variants", i, "M1A", "-o", f"{o}/v.csv",
                                                                  "--model", m], "fasta"),
    "generate": Command("masked", lambda i, o, m, r, lab: ["generate", i, "-o", f"{o}/g.tsv", "--model", m,
                                                           "--max-new-tokens", "4"], "fasta"),
    "infill": Command("masked", lambda i, o, m, r, lab: ["infill", i, "-o", f"{o}/i.fa", "--model", m], "fasta"),
    "preprocess": Command("fasta", lambda i, o, m, r, lab: ["preprocess", i, "-o", f"{o}/d"], "fasta"),
    "finetune": Command("fasta", lambda i, o, m, r, lab: ["finetune", i, "--labels", lab, "-o", f"{o}/r", "--model",
                                                          m, "--no-cache", "--val-fraction", "0.25",
                                                          "--max-epochs", "2"], "task"),
    "predict": Command("fasta", lambda i, o, m, r, lab: ["predict", r, i, "-o", f"{o}/p.csv", "--no-cache"], "task"),
    "finetune-table": Command("table", lambda i, o, m, r, lab: ["finetune", i, "-o", f"{o}/r", "--model", m,
                                                                "--no-cache", "--target", "location",
                                                                "--val-fraction", "0.25", "--max-epochs", "2"],
                              "table"),
    "predict-table": Command("table", lambda i, o, m, r, lab: ["predict", r, i, "-o", f"{o}/p.csv", "--no-cache"],
                             "table"),
}  # fmt: skip


def line_of(path: Path, rid: str, nth: int = 1) -> int:
    """The line of the `nth` header (FASTA) or row (table) of record `rid`."""
    data = path.read_bytes()
    marks = [m.start() for m in re.finditer(re.escape(b"\n>" + rid.encode()) + rb"[\s]", b"\n" + data)]
    if not marks:  # a table row
        marks = [m.start() for m in re.finditer(re.escape(b"\n" + rid.encode() + b","), b"\n" + data)]
    return data[: marks[nth - 1]].count(b"\n") + 1


def readable_lines(path: Path) -> tuple[int, int]:
    """(lowest, highest) line a cut-short gzip file can be reported at: the last line of the text that
    can be inflated, or one up to 1 MiB of text before it (gzip readers inflate block by block)."""
    text = zlib.decompressobj(31).decompress(path.read_bytes())
    return text[: max(0, len(text) - (1 << 20))].count(b"\n") + 1, text.count(b"\n") + 1


def expected(case: str, command: str, path: Path, corpus: Corpus) -> tuple[type, str] | None:
    """The outcome table: None (accepted), or the error class and a regex its whole message matches."""
    kind = COMMANDS[command].kind
    f = re.escape(str(path))
    second = corpus.records[1][0]
    if case in ACCEPTED:
        return None
    if case == "empty":
        if kind == "fasta":
            return FastaFormatError, rf"{f}: no FASTA records found"
        return TaskFormatError, rf"{f}: empty file \(no FASTA records, no table header\)"
    if case == "binary":
        if kind == "fasta":
            return FastaFormatError, rf"{f}:1: not FASTA: expected a '>' header line before any sequence"
        return TaskFormatError, rf"{f}:1: not FASTA nor a text table \(.*\)"
    if case in ("nul", "digit", "star"):
        line = line_of(path, second)
        problem = {
            "nul": r"invalid character '\\x00'", "digit": "invalid character '7'",
            "star": r"stop symbol '\*' inside the sequence \(only a single trailing '\*' is allowed\)",
        }[case]  # fmt: skip
        return InvalidSequenceError, rf"{f}:{line}, record '{re.escape(second)}': {problem} at position {BAD_AT + 1}"
    if case == "duplicate_id":
        first = corpus.records[0][0]
        line = line_of(path, first, 2)
        if kind == "table":
            return TaskFormatError, rf"{f}:{line}: record '{re.escape(first)}': duplicate id \(first seen at {f}:2\)"
        then = rf" \(first seen at {f}:1\)" if command == "preprocess" else ""
        return InvalidSequenceError, rf"{f}:{line}: record '{re.escape(first)}': duplicate id{then}"
    if case == "empty_id":
        if kind == "table":
            line = 3
            return TaskFormatError, rf"{f}:{line}: empty id"
        data = path.read_bytes()
        line = data[: data.index(b"\n>\n") + 1].count(b"\n") + 1
        return InvalidSequenceError, rf"{f}:{line}: header without an id"
    if case == "header_only":
        return InvalidSequenceError, rf"{f}:{line_of(path, second)}, record '{re.escape(second)}': empty sequence"
    if case == "gzip_cut_small":
        return InputFileError, rf"{f}:1: cannot read past this line: truncated or damaged gzip data \(.+\)"
    if case == "gzip_cut_large":
        return InputFileError, rf"{f}:(\d+): cannot read past this line: truncated or damaged gzip data \(.+\)"
    if case == "directory":
        return InputFileError, rf"{f}: cannot open: Is a directory"
    if case == "missing":
        return InputFileError, rf"{f}: cannot open: No such file or directory"
    assert case == "huge_protein"
    if command in ("score", "preprocess"):
        return None  # score masks the first 510 residues as pretraining did; preprocess drops it (too long)
    if command in ("generate", "infill"):
        at = rf"{f}:{line_of(path, 'huge')}, record 'huge'"
        return SequenceTooLongError, rf"{at}: \d+ encoder tokens, more than the model's \d+ positions"
    if command == "score-variants":
        at = rf"{f}:1, record 'huge' \({HUGE}\)"
        return SequenceTooLongError, rf"1 sequence\(s\) longer than the model's maximum of \d+ residues: {at}"
    return SequenceTooLongError, rf"{f}: 1 protein\(s\) longer than \d+ residues: huge \({HUGE}\); use --truncate .*"


# ------------------------------------------------------------------------------------------ the results
def check_result(command: str, out: Path, corpus: Corpus, case: str) -> None:
    """An accepted input gives the result of the plain file: every real record, with its real residues."""
    ids = [r[0] for r in corpus.records]
    seqs = {r[0]: r[1] for r in corpus.records}
    if command == "embed":
        with h5py.File(out / "e.h5") as h5:
            assert sorted(h5["per_residue"]) == sorted(ids)
            for rid in ids:
                assert h5["per_residue"][rid].shape == (len(seqs[rid]), 64)
                np.testing.assert_allclose(h5["mean"][rid][()], h5["per_residue"][rid][()].mean(0), atol=1e-6)
    elif command == "score":
        rows = list(csv.DictReader(open(out / "s.csv")))
        want = [*ids, "huge"] if case == "huge_protein" else ids
        assert [r["id"] for r in rows] == want
        assert [int(r["length"]) for r in rows] == [len(seqs.get(i, corpus.huge)) for i in want]
        assert all(0 < int(r["n_masked"]) <= 0.15 * 510 + 1 and float(r["loss"]) > 0 for r in rows)
    elif command == "score-variants":
        rows = list(csv.DictReader(open(out / "v.csv")))
        assert [r["variant"] for r in rows] == ["M1A"] and np.isfinite(float(rows[0]["score"]))
    elif command == "generate":
        rows = list(csv.DictReader(open(out / "g.tsv"), delimiter="\t"))
        assert [r["id"] for r in rows] == ids
    elif command == "infill":
        from prott5nv.fasta import read_fasta

        filled = {r.id: r.sequence for r in read_fasta(out / "i.fa")}
        assert list(filled) == ids
        for rid, seq in filled.items():  # every residue kept but the masked one
            real = seqs[rid]
            assert len(seq) == len(real) and seq[:MASK_AT] + seq[MASK_AT + 1 :] == real[:MASK_AT] + real[MASK_AT + 1 :]
    elif command == "preprocess":
        import json

        manifest = json.loads((out / "d" / "manifest.json").read_text())
        assert manifest["counts"]["kept"] == 4 and manifest["counts"]["too_long"] == (case == "huge_protein")
        assert manifest["splits"]["train"]["residues"] == sum(map(len, seqs.values()))
    elif command.startswith("finetune"):
        import json

        metrics = json.loads((out / "r" / "metrics.json").read_text())
        assert sum(metrics["counts"].values()) == 4
    else:  # predict: the output repeats each record's sequence
        rows = list(csv.DictReader(open(out / "p.csv")))
        assert [(r["id"], r["sequence"]) for r in rows] == [(i, seqs[i]) for i in ids]


# -------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_corpus(corpus, tiny_checkpoint, predictor_run, tmp_path, command, case):
    spec = COMMANDS[command]
    path = corpus.file(case, spec.layout)
    labels = tmp_path.parent / f"{tmp_path.name}_labels.csv"  # FASTA + --labels: one row per real record
    labels.write_text("id,location\n" + "".join(f"{r[0]},{r[2]}\n" for r in corpus.records) +
                      (f"huge,{corpus.records[0][2]}\n" if case == "huge_protein" else ""))  # fmt: skip
    out = tmp_path / "out"
    argv = spec.argv(str(path), str(out), str(tiny_checkpoint), str(predictor_run), str(labels))
    args = build_parser().parse_args(argv)
    want = expected(case, command, path, corpus)
    if want is None:
        assert args.func(args) in (0, None)
        check_result(command, out, corpus, case)
        return
    cls, pattern = want
    with pytest.raises(ProtT5nvError) as info:
        args.func(args)
    message = str(info.value)
    assert type(info.value) is cls, message
    match = re.fullmatch(pattern, message)
    assert match, f"{message!r} does not match {pattern!r}"
    if case == "gzip_cut_large":
        low, high = readable_lines(path)
        assert low <= int(match.group(1)) <= high, (low, match.group(1), high)
    assert not out.exists() or not any(out.iterdir())  # nothing written, nothing partial


@pytest.mark.parametrize("command", COMMANDS)
def test_the_cli_prints_one_line_and_exits_2(corpus, tiny_checkpoint, predictor_run, tmp_path, capsys, command):
    """What a user sees for a corpus error: `prott5nv CMD: error: MESSAGE`, one line, exit 2, no traceback."""
    spec = COMMANDS[command]
    path = corpus.file("digit", spec.layout)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,location\n" + "".join(f"{r[0]},{r[2]}\n" for r in corpus.records))
    argv = spec.argv(str(path), str(tmp_path / "out"), str(tiny_checkpoint), str(predictor_run), str(labels))
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"prott5nv {argv[0]}: error: {path}:") and "Traceback" not in "\n".join(err)
    assert [line for line in err if "error" in line] == err[-1:]
