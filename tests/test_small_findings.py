"""Issue 16, item 11: the small findings, each held by a test (a directory given as input and the line of a
truncated gzip file are in the bad-input corpus, test_bad_input_corpus.py; `generate -o -` writing a file
named '-' in test_output_safety.py)."""

from __future__ import annotations

import ast
import re
import sys

import h5py
import pytest
from conftest import REPO, SWISSPROT, TEST_DATA

from prott5nv.cli import COMMANDS, build_parser
from prott5nv.cli import main as cli_main
from prott5nv.fasta import read_fasta, write_fasta


@pytest.fixture
def three(tmp_path):
    short = (r for r in read_fasta(SWISSPROT) if len(r.sequence) <= 400)
    records = [(r.id, r.sequence) for r, _ in zip(short, range(3), strict=False)]
    write_fasta(records, tmp_path / "in.fa")
    return tmp_path / "in.fa"


def test_score_prints_nothing_before_an_input_error(tmp_path, three, tiny_checkpoint, capsys):
    """`score` showed its progress bar, then the one-line error: now the bar starts once the input is read."""
    bad = tmp_path / "bad.fa"
    bad.write_text(three.read_text().replace("\n", "\n7", 1))  # a digit starts record 1
    assert cli_main(["score", str(bad), "-o", str(tmp_path / "s.csv"), "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"prott5nv score: error: {bad}:1, record "), err


def test_infill_probabilities_is_shown_with_its_file():
    """The README showed a bare `--probabilities` (it takes the TSV to write)."""
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `prott5nv infill"))
    assert "`--probabilities FILE`" in row
    args = build_parser().parse_args(["infill", "in.fa", "-o", "out.fa", "--probabilities", "p.tsv"])
    assert args.probabilities == "p.tsv"


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in COMMANDS])
def test_help_has_no_sphinx_markup(command, capsys):
    """`pretrain --help` showed ":class:`~prott5nv.train.config.TrainConfig`" (its docstring as written)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    shown = capsys.readouterr().out
    assert f"usage: prott5nv {command}" in shown
    assert not re.search(r":(class|func|mod|meth|attr|data):|``", shown), shown


def test_an_output_name_with_an_unknown_suffix_is_refused(tmp_path, three, tiny_checkpoint, capsys):
    """`embed -o emb.hdf` made a directory of .npy files: .hdf is HDF5 now, and a suffix that names no
    format is refused (one line, nothing made) unless --format says what to write."""
    model = ["--model", str(tiny_checkpoint)]
    assert cli_main(["embed", str(three), "-o", str(tmp_path / "emb.hdf"), *model]) == 0
    assert h5py.is_hdf5(tmp_path / "emb.hdf")
    capsys.readouterr()
    assert cli_main(["embed", str(three), "-o", str(tmp_path / "emb.txt"), *model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'.txt' names no embedding format" in err and "--format" in err
    assert not (tmp_path / "emb.txt").exists()
    assert cli_main(["embed", str(three), "-o", str(tmp_path / "emb.txt"), "--format", "npy", *model]) == 0
    assert (tmp_path / "emb.txt" / "index.tsv").is_file()


def test_benchmarks_read_data_from_this_checkout():
    """Benchmarks read /work/shared/data/... (the development machine's path): every path now comes from
    benchmarks/_data.py (beside the checkout, else tests/data) or a flag, and the default exists."""
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        strings = [n.value for n in ast.walk(ast.parse(script.read_text())) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)]  # fmt: skip
        assert not [s for s in strings if re.search(r"(^|\s)/(work|home|root|Users)/", s)], script
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _data import SHIPPED, swissprot
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert swissprot().is_file() and SHIPPED == TEST_DATA / "swissprot_3k.fasta.gz"
