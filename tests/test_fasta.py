"""FASTA reading on real files: plain/gzip, layout variants, block boundaries, exact error texts."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from prott5nv.data import fastscan
from prott5nv.errors import FastaFormatError, InputFileError, InvalidSequenceError
from prott5nv.fasta import FastaReader, read_fasta
from prott5nv.sequence import SequencePolicy


def records(path: Path, **kw) -> list[tuple[str, str, int]]:
    return [(r.id, r.sequence, r.line) for r in read_fasta(path, **kw)]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.fixture(autouse=True, params=["c", "numpy"])
def parser(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: with the C accelerator (the default where it was built) and with the
    numpy path that replaces it where no compiler was available."""
    if request.param == "numpy":
        monkeypatch.setattr(fastscan, "_fastscan", None)
    return request.param


@pytest.fixture(scope="session")
def plain_parse(naive_fasta):
    return naive_fasta


@pytest.fixture(scope="module")
def first_records(swissprot_2k: Path, naive_fasta) -> list[tuple[str, str, int]]:
    return naive_fasta(swissprot_2k)[:20]


def test_plain_swissprot_matches_naive_parse(plain_parse, swissprot_2k: Path) -> None:
    got = records(swissprot_2k)
    assert len(got) == 2000
    assert got == plain_parse(swissprot_2k)
    assert got[0][0] == "sp|Q6J1Z5|"


def test_whole_real_sample_matches_naive_parse(test_data: Path, naive_fasta) -> None:
    """All 3,000 bundled Swiss-Prot records (ids, sequences, header lines) through the fast path; the
    descriptions are the header text after the id."""
    path = test_data / "swissprot_3k.fasta.gz"
    got = list(read_fasta(path))
    assert [(r.id, r.sequence, r.line) for r in got] == naive_fasta(path)
    headers = [line for line in gzip.open(path, "rt") if line.startswith(">")]
    assert [r.description for r in got] == [(h[1:].split(None, 1) + [""])[1].strip() for h in headers]


def test_gzip_detected_by_content_not_name(swissprot_2k: Path, tmp_path: Path) -> None:
    packed = tmp_path / "no_gz_suffix.fa"
    packed.write_bytes(gzip.compress(swissprot_2k.read_bytes()))
    assert records(packed) == records(swissprot_2k)


def test_prodigal_proteome_stops_removed(plain_parse, test_data: Path) -> None:
    path = test_data / "proteome_HG003687.faa"
    got = list(read_fasta(path))
    assert len(got) == 2100
    assert [(r.id, r.sequence, r.line) for r in got] == plain_parse(path)
    assert not any(r.sequence.endswith("*") for r in got)
    text = path.read_text()
    assert text.count("*") == sum(raw.rstrip().endswith("*") for raw in text.split(">")) == 2099  # 1 partial
    assert got[0].id == "938293.PRJEB85.HG003688_1"
    assert got[0].description.startswith("# 204 # 629 # -1 # ID=1_1;")


def test_crlf_blank_lines_lowercase_and_spaces(first_records, tmp_path: Path) -> None:
    text = "".join(
        f"\r\n>{rid} some description\r\n\r\n{seq[:40].lower()}\r\n{seq[40:]}  \r\n\r\n"
        for rid, seq, _ in first_records
    )
    got = records(write(tmp_path / "win.fa", text))
    assert [(r, s) for r, s, _ in got] == [(r, s) for r, s, _ in first_records]
    assert [line for *_, line in got] == [2 + 6 * i for i in range(len(first_records))]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_block_boundaries_anywhere(
    plain_parse, swissprot_2k: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    head = b">".join(swissprot_2k.read_bytes().split(b">")[:60])  # 59 records
    path = swissprot_2k.parent / f"head_{chunk}.fa"
    path.write_bytes(head)
    expected = plain_parse(path)
    monkeypatch.setattr(fastscan, "_CHUNK", chunk)
    assert records(path) == expected


def test_uniref_header_keeps_accession(first_records, tmp_path: Path) -> None:
    (_, seq0, _), (_, seq1, _) = first_records[:2]
    text = (
        f">UniRef50_Q6J1Z5 Uncharacterized protein n=2 Tax=Bacteria TaxID=2 RepID=Q6J1Z5_9BACT\n{seq0}\n"
        f">UniRef50_A0A0B4 Protein n=1 Tax=Homo sapiens TaxID=9606 RepID=A0A0B4_HUMAN\n{seq1}\n"
    )
    got = list(read_fasta(write(tmp_path / "uniref.fa", text)))
    assert [r.id for r in got] == ["UniRef50_Q6J1Z5", "UniRef50_A0A0B4"]
    assert got[0].description == "Uncharacterized protein n=2 Tax=Bacteria TaxID=2 RepID=Q6J1Z5_9BACT"
    assert [r.sequence for r in got] == [seq0, seq1]


def test_comment_lines_and_blank_id_prefix(first_records, tmp_path: Path) -> None:
    (rid, seq, _) = first_records[0]
    got = records(write(tmp_path / "c.fa", f";old comment\n\n>  {rid} x\n{seq}\n"))
    assert got == [(rid, seq, 3)]


def test_sequence_before_header(first_records, tmp_path: Path) -> None:
    rid, seq, _ = first_records[0]
    path = write(tmp_path / "nohead.fa", f"\n{seq[:60]}\n>{rid}\n{seq}\n")
    with pytest.raises(FastaFormatError) as exc:
        list(read_fasta(path))
    assert str(exc.value) == f"{path}:2: not FASTA: expected a '>' header line before any sequence"


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.fa", "\n\n")
    with pytest.raises(FastaFormatError, match=f"^{empty}: no FASTA records found$"):
        list(read_fasta(empty))
    with pytest.raises(InputFileError, match="missing.fa: cannot open: No such file or directory"):
        list(read_fasta(tmp_path / "missing.fa"))
    with pytest.raises(InputFileError, match=f"^{tmp_path}: cannot open: Is a directory$"):
        list(read_fasta(tmp_path))


def test_byte_order_mark_and_leading_blank_lines_read_as_the_plain_file(first_records, tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (Windows editors) and blank lines before the first record: skipped, plain or
    gzip, with the same records and header line numbers as without the mark."""
    plain = "\n\n" + "".join(f">{rid} real\n{seq}\n" for rid, seq, _ in first_records[:5])
    want = [(r.id, r.sequence, r.line) for r in read_fasta(write(tmp_path / "plain.fa", plain))]
    assert [(rid, seq) for rid, seq, _ in want] == [(rid, seq) for rid, seq, _ in first_records[:5]]
    assert want[0][2] == 3
    marked = b"\xef\xbb\xbf" + plain.encode()
    for name, data in (("bom.fa", marked), ("bom.fa.gz", gzip.compress(marked))):
        assert [(r.id, r.sequence, r.line) for r in read_fasta(write(tmp_path / name, data))] == want


def bad_file(first_records, tmp_path: Path, edit) -> tuple[Path, str]:
    """The first 20 real records with record 5 edited by `edit(seq)`; returns path and record 5's id."""
    lines = []
    for i, (rid, seq, _) in enumerate(first_records):
        lines += [f">{rid}", edit(seq) if i == 5 else seq]
    return write(tmp_path / "bad.fa", "\n".join(lines) + "\n"), first_records[5][0]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda s: s[:9] + "J" + s[10:], "unknown residue 'J' (use --unknown-to-x to map unknown letters to X) "
         "at position 10"),
        (lambda s: s[:9] + "1" + s[10:], "invalid character '1' at position 10"),
        (lambda s: s[:9] + "*" + s[10:], "stop symbol '*' inside the sequence (only a single trailing '*' is "
         "allowed) at position 10"),
        (lambda s: s[:9] + "-" + s[10:], "alignment gap '-' (use --strip-gaps to remove gaps) at position 10"),
        (lambda s: "", "empty sequence"),
        (lambda s: s[:9] + "**", "stop symbol '*' inside the sequence (only a single trailing '*' is allowed) "
         "at position 10"),
    ],
)  # fmt: skip
def test_bad_record_names_file_line_and_id(first_records, tmp_path: Path, edit, problem: str) -> None:
    path, rid = bad_file(first_records, tmp_path, edit)
    with pytest.raises(InvalidSequenceError) as exc:
        list(read_fasta(path))
    assert str(exc.value) == f"{path}:11, record '{rid}': {problem}"
    reader = FastaReader(path, skip_invalid=True)
    got = [r.id for r in reader]
    assert got == [r for i, (r, _, _) in enumerate(first_records) if i != 5]
    assert reader.skipped == 1 and reader.records == 19
    assert reader.skipped_messages == [str(exc.value)]


def test_duplicate_id_and_missing_id(first_records, tmp_path: Path) -> None:
    (a, sa, _), (_, sb, _) = first_records[:2]
    path = write(tmp_path / "dup.fa", f">{a}\n{sa}\n>{a}\n{sb}\n")
    with pytest.raises(InvalidSequenceError) as exc:
        list(read_fasta(path))
    assert str(exc.value) == f"{path}:3: record '{a}': duplicate id"
    assert [r.sequence for r in read_fasta(path, check_duplicates=False)] == [sa, sb]
    path = write(tmp_path / "noid.fa", f">\n{sa}\n>{a}\n{sb}\n")
    with pytest.raises(InvalidSequenceError, match=f"^{path}:1: header without an id$"):
        list(read_fasta(path))
    reader = FastaReader(path, skip_invalid=True)
    assert [(r.id, r.sequence, r.line) for r in reader] == [(a, sb, 3)] and reader.skipped == 1


def test_policies_strip_gaps_and_unknown_to_x(first_records, tmp_path: Path) -> None:
    rid, seq, _ = first_records[0]
    path = write(tmp_path / "gaps.fa", f">{rid}\n{seq[:10]}--{seq[10:20]}.j{seq[20:]}\n")
    got = next(read_fasta(path, SequencePolicy(strip_gaps=True, unknown_to_x=True)))
    assert got.sequence == seq[:20] + "X" + seq[20:]


def test_on_read_sees_raw_bytes(swissprot_2k: Path, tmp_path: Path) -> None:
    packed = tmp_path / "p.fa.gz"
    packed.write_bytes(gzip.compress(swissprot_2k.read_bytes()))
    seen: list[bytes] = []
    n = sum(1 for _ in FastaReader(packed, on_read=lambda chunk: seen.append(bytes(chunk))))
    assert n == 2000 and b"".join(seen) == packed.read_bytes()


def test_blocks_across_many_units(first_records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastscan, "_CHUNK", 300)  # many units: errors must still count lines across them
    path, rid = bad_file(first_records, tmp_path, lambda s: s)
    blocks = list(FastaReader(path).blocks())
    assert len(blocks) > 3 and all(b.descriptions is None for b in blocks)
    assert all(b.packed == b"".join(s + b"\n" for s in b.sequences) for b in blocks)
    assert all(b.id_packed == b"".join(i + b"\n" for i in b.ids) for b in blocks)
    assert [s.decode() for b in blocks for s in b.sequences] == [s for _, s, _ in first_records]
    assert [n for b in blocks for n in b.lengths.tolist()] == [len(s) for _, s, _ in first_records]
    assert [n for b in blocks for n in b.lines.tolist()] == list(range(1, 40, 2))
    lines = path.read_text().splitlines()
    lines[31] = lines[31][:4] + "#" + lines[31][5:]  # record 16's sequence line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidSequenceError) as exc:
        list(FastaReader(path).blocks())
    assert str(exc.value) == f"{path}:31, record '{first_records[15][0]}': invalid character '#' at position 5"


def variants(first_records) -> dict[str, str]:
    """The same real records laid out in ways the whole-array path must read exactly like the naive parse."""
    recs = first_records
    return {
        "plain": "".join(f">{r} some description\n{s}\n" for r, s, _ in recs),
        "wrapped_no_final_newline": "".join(f">{r}\n{s[:60]}\n{s[60:]}\n" for r, s, _ in recs).rstrip("\n"),
        "tabs_and_blanks_in_headers": "".join(f">{r}\tdesc  more \n{s}\n" for r, s, _ in recs),
        "blank_lines": "".join(f"\n>{r}\n\n{s[:50]}\n\n{s[50:]}\n\n" for r, s, _ in recs),
        "crlf": "".join(f">{r} d\r\n{s[:30]}\r\n{s[30:]}\r\n" for r, s, _ in recs),
        "lowercase": "".join(f">{r}\n{s.lower()}\n" for r, s, _ in recs),
        "blanks_in_sequence": "".join(f">{r}\n{s[:10]} {s[10:20]}\t{s[20:]}\n" for r, s, _ in recs),
        "stops": "".join(f">{r}\n{s}*\n" for r, s, _ in recs),
    }


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 20])
def test_layouts_match_naive_parse(first_records, naive_fasta, tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(fastscan, "_CHUNK", chunk)
    for name, text in variants(first_records).items():
        path = write(tmp_path / f"{name}.fa", text)
        got = list(read_fasta(path))
        naive = [(rid, "".join(seq.split()), line) for rid, seq, line in naive_fasta(path)]  # no inner blanks
        assert [(r.id, r.sequence, r.line) for r in got] == naive, name
        assert [(r.id, r.sequence) for r in got] == [(r, s) for r, s, _ in first_records], name
        if name == "tabs_and_blanks_in_headers":
            assert {r.description for r in got} == {"desc  more"}
        blocks = list(FastaReader(path).blocks())
        assert b"".join(b.packed for b in blocks) == b"".join(s.encode() + b"\n" for _, s, _ in first_records)
        gz = write(tmp_path / f"{name}.fa.gz", gzip.compress(text.encode()))
        assert [(r.id, r.sequence, r.line) for r in read_fasta(gz)] == naive, name


def test_common_files_take_the_whole_array_path(swissprot_2k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Swiss-Prot text needs no record-by-record work (the point of the fast path)."""
    def refuse(*args, **kwargs):
        raise AssertionError("careful path used")

    monkeypatch.setattr(FastaReader, "_parse", refuse)
    monkeypatch.setattr(fastscan, "_CHUNK", 1 << 16)  # several units
    blocks = list(FastaReader(swissprot_2k).blocks())
    assert len(blocks) > 3 and sum(map(len, blocks)) == 2000


def test_bad_record_in_a_later_unit_names_its_line(
    first_records, naive_fasta, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastscan, "_CHUNK", 700)
    text = "".join(f">{r} x\n{s[:60]}\n{s[60:]}\n" for r, s, _ in first_records)
    path = write(tmp_path / "late.fa", text.replace(first_records[17][1][60:70], first_records[17][1][60:65] + ">" +
                                                    first_records[17][1][66:70]))  # fmt: skip
    line = naive_fasta(path)[17][2]
    with pytest.raises(InvalidSequenceError) as exc:
        list(read_fasta(path))
    assert str(exc.value) == f"{path}:{line}, record '{first_records[17][0]}': invalid character '>' at position 66"
    reader = FastaReader(path, skip_invalid=True)
    assert [r.id for r in reader] == [r for i, (r, _, _) in enumerate(first_records) if i != 17]

