"""Scoring: masked-token loss against a hand computation, seeds, order invariance, variant effects, CLI."""

from __future__ import annotations

import csv
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from prott5nv.api import ProtT5nv
from prott5nv.checkpoint import save_pretrained
from prott5nv.cli import main
from prott5nv.data.masking import T5Masker
from prott5nv.errors import InvalidSequenceError, ProtT5nvError
from prott5nv.fasta import write_fasta
from prott5nv.inference.score import score_fasta, score_sequences, score_variants
from prott5nv.tokenizer import ProteinTokenizer


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def fasta(real_proteins, tmp_path_factory):
    path = tmp_path_factory.mktemp("score") / "proteins.fasta"
    write_fasta(real_proteins, path)
    return path


def test_loss_matches_hand_computation(tiny_model, real_proteins, fasta, tmp_path):
    out = tmp_path / "scores.csv"
    summary = score_fasta(tiny_model, fasta, out, seed=5)
    rows = read_csv(out)
    assert list(rows[0]) == ["id", "length", "n_masked", "loss", "perplexity"]
    assert [r["id"] for r in rows] == [rid for rid, _ in real_proteins]  # input order
    tok = tiny_model.tokenizer
    masker = T5Masker(tok, 512, 512, masked_lm_prob=0.15, seed=5)
    total_nll = total_n = 0.0
    for (_, seq), row in zip(real_proteins, rows, strict=True):
        s = masker(tok.encode(seq), index=zlib.crc32(seq.encode()))
        with torch.no_grad():
            logits = tiny_model.model(torch.from_numpy(s.text_enc)[None], None, torch.from_numpy(s.text_dec)[None])[0]
        ce = F.cross_entropy(logits, torch.tensor(s.labels), reduction="none")
        residue = torch.tensor([int(t) in tok.residue_ids for t in s.labels])  # not sentinels, not EOS
        assert int(residue.sum()) == round(0.15 * len(seq)) == int(row["n_masked"])
        assert int(row["length"]) == len(seq)
        loss = float(ce[residue].mean())
        assert float(row["loss"]) == pytest.approx(loss, abs=2e-5)
        assert float(row["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-4)
        total_nll += float(ce[residue].sum())
        total_n += int(residue.sum())
    assert summary.masked == total_n
    assert summary.perplexity == pytest.approx(math.exp(total_nll / total_n), rel=1e-5)
    assert f"perplexity {summary.perplexity:.3f}" in summary.line()


def test_seeded_reproducible_and_order_invariant(tiny_model, real_proteins, fasta, tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    score_fasta(tiny_model, fasta, a, seed=1, batch_tokens=600)
    score_fasta(tiny_model, fasta, b, seed=1, batch_tokens=100_000)
    score_fasta(tiny_model, fasta, c, seed=2)
    rows_a = read_csv(a)
    for x, y in zip(rows_a, read_csv(b), strict=True):
        assert x["n_masked"] == y["n_masked"] and float(x["loss"]) == pytest.approx(float(y["loss"]), abs=1e-5)
    assert [r["loss"] for r in rows_a] != [r["loss"] for r in read_csv(c)]
    # one protein alone, from another file, gets the same mask and loss
    single = tmp_path / "one.fasta"
    write_fasta([real_proteins[3]], single)
    score_fasta(tiny_model, single, tmp_path / "one.csv", seed=1)
    (one,) = read_csv(tmp_path / "one.csv")
    assert float(one["loss"]) == pytest.approx(float(rows_a[3]["loss"]), abs=1e-5)


def test_pseudo_likelihood_matches_masking_each_residue_by_hand(tiny_model, real_proteins, tmp_path):
    """--pll: every residue masked alone (sentinel 0), log p of the true residue summed; batching within
    a protein does not change it; the CLI writes the same numbers with n_masked = residues scored."""
    tok = tiny_model.tokenizer
    proteins = [(rid, seq[:40]) for rid, seq in real_proteins[:2]] + [("long", real_proteins[4][1] * 3)]
    got = score_sequences(tiny_model, [s for _, s in proteins], [r for r, _ in proteins], pseudo_likelihood=True,
                          batch_tokens=300)  # fmt: skip
    rid, seq = proteins[0]
    ids = tok.encode(seq)
    by_hand = 0.0
    for i in range(len(seq)):
        enc = ids.copy()
        enc[i] = tok.sentinel(0)
        dec = torch.tensor([[tok.decoder_start_id, tok.sentinel(0), int(ids[i])]])
        with torch.no_grad():
            logits = tiny_model.model(torch.from_numpy(enc)[None], None, dec)[0]
        by_hand -= float(logits.log_softmax(-1)[1, int(ids[i])])
    assert got[0].n_masked == len(seq) and got[0].nll == pytest.approx(by_hand, rel=1e-5)
    assert got[2].length == 3 * len(real_proteins[4][1]) > 510 and got[2].n_masked == 510  # first 510, as masked
    fasta = tmp_path / "p.fasta"
    write_fasta(proteins, fasta)
    assert main(["score", str(fasta), "-o", str(tmp_path / "pll.csv"), "--pll", "--model",
                 str(save_pretrained(tiny_model.model, tok, tmp_path / "m"))]) == 0  # fmt: skip
    rows = read_csv(tmp_path / "pll.csv")
    assert [int(r["n_masked"]) for r in rows] == [g.n_masked for g in got]
    for row, g in zip(rows, got, strict=True):
        assert float(row["loss"]) == pytest.approx(g.loss, abs=2e-5)


def test_variant_scores_antisymmetric(tiny_model, real_proteins):
    wt = real_proteins[1][1][:150]
    pos = 23
    assert wt[pos - 1] != "G"
    mutant = wt[: pos - 1] + "G" + wt[pos:]
    forward = score_variants(tiny_model, wt, [f"{wt[pos - 1]}{pos}G"])[0]
    backward = score_variants(tiny_model, mutant, [f"G{pos}{wt[pos - 1]}"])[0]
    assert forward.score == pytest.approx(-backward.score, abs=1e-5)
    assert forward.score == pytest.approx(forward.log_p_mut - forward.log_p_wt)
    # several sites at once, and the identity variant
    double = f"{wt[9]}10W:{wt[39]}40C"
    mutant2 = wt[:9] + "W" + wt[10:39] + "C" + wt[40:]
    d1 = score_variants(tiny_model, wt, [double, f"{wt[9]}10{wt[9]}"])
    d2 = score_variants(tiny_model, mutant2, [f"W10{wt[9]}:C40{wt[39]}"])[0]
    assert d1[0].score == pytest.approx(-d2.score, abs=1e-5)
    assert d1[1].score == 0.0


def test_variant_errors(tiny_model):
    with pytest.raises(InvalidSequenceError, match="wild-type residue at position 2 is K, not A"):
        score_variants(tiny_model, "MKTLLV", ["A2G"])
    for bad in ("K2", "K9G", "2KG", "K2J"):
        with pytest.raises(InvalidSequenceError):
            score_variants(tiny_model, "MKTLLV", [bad])


def test_collapsed_sentinels_refused(tiny_model, fasta, tmp_path):
    collapsed = ProtT5nv(tiny_model.model, ProteinTokenizer(sentinels="collapsed"))
    with pytest.raises(ProtT5nvError, match="distinct sentinel"):
        score_fasta(collapsed, fasta, tmp_path / "x.csv")
    with pytest.raises(ProtT5nvError, match="distinct sentinel"):
        score_variants(collapsed, "MKTLLV", ["K2A"])
    assert not (tmp_path / "x.csv").exists()


def test_cli_score_and_score_variants(tiny_model, fasta, tmp_path, capsys):
    model = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "tiny")
    out = tmp_path / "scores.csv"
    assert main(["score", str(fasta), "--model", str(model), "-o", str(out), "--seed", "3"]) == 0
    assert "perplexity" in capsys.readouterr().out and len(read_csv(out)) == 8
    bad = tmp_path / "bad.fasta"
    bad.write_text(">x\nMKT1LV\n")
    assert main(["score", str(bad), "--model", str(model), "-o", str(tmp_path / "no.csv")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "no.csv").exists()

    variants = tmp_path / "variants.txt"
    variants.write_text("K2A\nT3G,L4W\n")
    vout = tmp_path / "variants.csv"
    assert main(["score-variants", "--sequence", "MKTLLVAGLSE", "--variants", str(variants), "L5P:V6E",
                 "--model", str(model), "-o", str(vout)]) == 0  # fmt: skip
    assert [r["variant"] for r in read_csv(vout)] == ["L5P:V6E", "K2A", "T3G", "L4W"]
    assert main(["score-variants", "--sequence", "MKTLLV", "A2G", "--model", str(model), "-o", str(vout),
                 "--overwrite"]) == 2  # fmt: skip
    assert "not A" in capsys.readouterr().err
