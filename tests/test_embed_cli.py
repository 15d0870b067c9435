"""`prott5nv embed` end to end on real proteins, and every bad-input case leaving no output behind."""

from __future__ import annotations

import gzip
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import DEMO_DIM, PROTEOME, REPO, SAMPLE_FASTA

import prott5nv
from prott5nv.cli import main
from prott5nv.fasta import write_fasta


def run_cli(*args: str) -> int:
    return main(["embed", *map(str, args)])


def test_embed_sample_matches_api(tmp_path, capsys):
    out = tmp_path / "emb.h5"
    assert run_cli(SAMPLE_FASTA, "-o", out, "--batch-tokens", "2000") == 0
    summary = capsys.readouterr().out
    records = list(prott5nv.read_fasta(SAMPLE_FASTA))
    residues = sum(len(r.sequence) for r in records)
    assert f"embedded {len(records)} proteins ({residues} residues)" in summary
    api = prott5nv.load("prott5nv-demo")
    expected = api.seqs_to_embedding([r.sequence for r in records]).numpy()
    with h5py.File(out) as f:
        assert len(f) == len(records) == 48
        assert f.attrs["model"] == "prott5nv-demo" and f.attrs["pooling"] == "mean"
        for i, r in enumerate(records):
            ds = f[r.id]
            assert ds.attrs["original_id"] == r.id and ds.shape == (api.embedding_dim,)
            np.testing.assert_allclose(ds[()], expected[i], atol=1e-5, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["emb.h5"]


def test_reproducibility_is_what_the_readme_says(tmp_path):
    """README (*Precision and devices*): fp32 `embed` gives the same bits for the same command, and a
    protein in a batch of its own (`--batch-tokens 1`) gets bit for bit what `seqs_to_hiddens` and
    `seqs_to_embedding` give it alone (same threads; the mean is summed in float64 by both); batched with
    proteins of other lengths, values agree to the last bits only (issue 16: 0/48 equal, max 4.8e-7)."""
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "a protein embedded in a batch of its own (`--batch-tokens 1`) gets bit for bit what" in readme
    records = list(prott5nv.read_fasta(SAMPLE_FASTA))[:16]
    fasta = tmp_path / "s.fasta"
    write_fasta([(r.id, r.sequence) for r in records], fasta)
    threads = torch.get_num_threads()
    try:
        runs = {}
        for name, batching in (("alone", ["--batch-tokens", "1"]), ("again", ["--batch-tokens", "1"]), ("batched", [])):
            out = tmp_path / f"{name}.h5"
            assert run_cli(fasta, "-o", out, "--per-residue", "--pooling", "mean", "--threads", "1", *batching) == 0
            with h5py.File(out) as f:
                runs[name] = {r.id: (f["mean"][r.id][()], f["per_residue"][r.id][()]) for r in records}
        api = prott5nv.load("prott5nv-demo")
        torch.set_num_threads(1)
        for r in records:
            hiddens, mask = api.seqs_to_hiddens([r.sequence])
            mean, rows = runs["alone"][r.id]
            np.testing.assert_array_equal(rows, hiddens[0, : int(mask.sum())].numpy())
            np.testing.assert_array_equal(mean, api.seqs_to_embedding([r.sequence])[0].numpy())
            for got, want in zip(runs["again"][r.id], runs["alone"][r.id], strict=True):
                np.testing.assert_array_equal(got, want)
            for got, want in zip(runs["batched"][r.id], runs["alone"][r.id], strict=True):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_per_residue_on_prodigal_proteome_with_stop_symbols(tmp_path):
    """Real Prodigal output: headers with coordinates, trailing '*'; ids with '/'-free first words."""
    records = list(prott5nv.read_fasta(PROTEOME))[:30]
    small = tmp_path / "few.faa"
    with open(PROTEOME) as src, open(small, "w") as dst:  # the original text, stops and all
        n = 0
        for line in src:
            n += line.startswith(">")
            if n > 30:
                break
            dst.write(line)
    out = tmp_path / "res.h5"
    assert run_cli(small, "-o", out, "--per-residue", "--truncate") == 0
    with h5py.File(out) as f:
        assert len(f) == 30
        for r in records:
            assert f[r.id].shape == (min(len(r.sequence), 512), DEMO_DIM)


def test_gzip_input_detected_by_content(tmp_path):
    raw = SAMPLE_FASTA.read_bytes()
    gz = tmp_path / "sample.fasta"  # no .gz suffix on purpose
    gz.write_bytes(gzip.compress(raw))
    plain_out, gz_out = tmp_path / "a.h5", tmp_path / "b.h5"
    assert run_cli(SAMPLE_FASTA, "-o", plain_out) == 0
    assert run_cli(gz, "-o", gz_out) == 0
    with h5py.File(plain_out) as a, h5py.File(gz_out) as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k][()], b[k][()])


def _bad(tmp_path, text: str | bytes) -> tuple[int, str, list[str]]:
    path = tmp_path / "bad.fasta"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            ">sp|P1|\nMKTAYIAK\n>sp|P2|\nMKT1AYIAK\n",
            "bad.fasta:3, record 'sp|P2|': invalid character '1' at position 4",
        ),
        (">sp|P1|\nMKTAYIAK\n>sp|P2|\n\n>sp|P3|\nMKT\n", "bad.fasta:3, record 'sp|P2|': empty sequence"),
        ("", "bad.fasta: no FASTA records found"),
        ("\n\n", "bad.fasta: no FASTA records found"),
        (">a\nMKT\n>b\nMKV\n>a\nMKL\n", "bad.fasta:5: record 'a': duplicate id"),
        ("id,sequence\nP1,MKTAYIAK\n", "bad.fasta:1: not FASTA: expected a '>' header line before any sequence"),
        (gzip.compress(b"\x00\x01binary\xff"), "bad.fasta:1: not FASTA: expected a '>' header line"),
        (">x/1\nMKT\n>x_1\nMKV\n", "record 'x_1': its output name 'x_1' clashes with record 'x/1'"),
    ],
)
def test_bad_input_clear_error_and_no_output(tmp_path, capsys, content, message):
    path = _bad(tmp_path, content)
    out = tmp_path / "out.h5"
    assert run_cli(path, "-o", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("prott5nv embed: error: ") and message in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]


def test_too_long_refused_with_list_then_truncated(tmp_path, capsys):
    fasta = tmp_path / "long.fasta"
    records = [r for r in prott5nv.read_fasta(PROTEOME) if len(r.sequence) > 512][:3]
    short = [r for r in prott5nv.read_fasta(PROTEOME) if len(r.sequence) < 100][:2]
    write_fasta([(r.id, r.sequence) for r in short + records], fasta)
    out = tmp_path / "o.h5"
    assert run_cli(fasta, "-o", out) == 2
    err = capsys.readouterr().err
    assert "3 protein(s) longer than 512 residues" in err and "--truncate" in err
    for r in records:
        assert f"{r.id} ({len(r.sequence)})" in err
    assert not out.exists()
    assert run_cli(fasta, "-o", out, "--truncate", "--per-residue") == 0
    assert "3 truncated" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert [f[r.id].shape[0] for r in records] == [512, 512, 512]
    assert run_cli(fasta, "-o", out, "--max-length", "600", "--overwrite") == 2
    assert "--max-length 600 exceeds the model's maximum of 512 residues" in capsys.readouterr().err


def test_missing_input_and_unknown_model(tmp_path, capsys):
    assert run_cli(tmp_path / "nope.fasta", "-o", tmp_path / "o.h5") == 2
    assert "nope.fasta: cannot open: No such file or directory" in capsys.readouterr().err
    assert run_cli(SAMPLE_FASTA, "-o", tmp_path / "o.h5", "--model", "nope") == 2
    assert "no model named or at 'nope'" in capsys.readouterr().err


def test_console_script_and_python_m(tmp_path):
    """The installed `prott5nv` entry point and `python -m prott5nv` run the same CLI."""
    exe = [sys.executable, "-m", "prott5nv"]
    res = subprocess.run([*exe, "info", "prott5nv-base", "--json"], capture_output=True, text=True, check=True)
    assert '"parameters": 198970496' in res.stdout
    res = subprocess.run([*exe, "embed", str(tmp_path / "x.fa"), "-o", str(tmp_path / "o.h5")],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
