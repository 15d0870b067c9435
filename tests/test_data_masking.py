"""T5 span corruption on real proteins: recoverability, masking rate, sentinel order, padding, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prott5nv.data.masking import DenoiseMasker, MixedMasker, T5Masker, T5Sample, build_masker, collate_t5
from prott5nv.errors import ConfigError
from prott5nv.fasta import read_fasta
from prott5nv.tokenizer import ProteinTokenizer

TOK = ProteinTokenizer()


@pytest.fixture(scope="module")
def proteins(swissprot_2k: Path) -> list[np.ndarray]:
    return [TOK.encode_residues(r.sequence) for r in read_fasta(swissprot_2k)][:600]


def unmask(sample: T5Sample, tok: ProteinTokenizer) -> np.ndarray:
    """Rebuild the original tokens from encoder input and labels."""
    sentinel_rank = {s: i for i, s in enumerate(tok.sentinel_ids)}
    spans: list[list[int]] = []
    for t in sample.labels[:-1].tolist():
        if t in sentinel_rank:
            assert sentinel_rank[t] == len(spans)  # sentinels in order in the target
            spans.append([])
        else:
            spans[-1].append(t)
    out: list[int] = []
    used = 0
    enc = sample.text_enc[:-1] if tok.add_eos else sample.text_enc
    for t in enc.tolist():
        if t in sentinel_rank:
            assert sentinel_rank[t] == used  # sentinels in order in the encoder input
            out += spans[used]
            used += 1
        else:
            out.append(t)
    assert used == len(spans)
    return np.array(out)


@pytest.mark.parametrize("span", [1.0, 3.0])
def test_every_residue_recoverable_and_rate(proteins, span: float) -> None:
    masker = T5Masker(TOK, mean_span_length=span, seed=11)
    masked = total = 0
    for i, ids in enumerate(proteins):
        s = masker(ids, i)
        tokens = ids[:510]
        assert np.array_equal(unmask(s, TOK), tokens)
        n = len(s.labels) - 1 - int(np.isin(s.labels, TOK.sentinel_ids).sum())
        assert n == max(1, round(0.15 * len(tokens)))  # NeMo's count
        sentinels = s.text_enc[np.isin(s.text_enc, TOK.sentinel_ids)]
        assert sentinels.tolist() == TOK.sentinel_ids[: len(sentinels)]
        assert len(set(sentinels.tolist())) == len(sentinels)
        if span == 1.0:
            assert len(sentinels) == n and len(s.text_enc) == len(tokens)
        assert s.text_dec[0] == TOK.bos_id and s.labels[-1] == TOK.eos_id
        assert np.array_equal(s.text_dec[1:], s.labels[:-1])
        assert len(s.text_enc) <= 512 and len(s.text_dec) <= 256
        masked += n
        total += len(tokens)
    assert abs(masked / total - 0.15) <= 0.005


def test_deterministic_per_seed_epoch_index(proteins) -> None:
    ids = proteins[0]
    a, b = T5Masker(TOK, seed=1), T5Masker(TOK, seed=1)
    assert np.array_equal(a(ids, 7).text_enc, b(ids, 7).text_enc)
    assert not np.array_equal(a(ids, 7).text_enc, a(ids, 8).text_enc)
    assert not np.array_equal(a(ids, 7, epoch=1).text_enc, a(ids, 7).text_enc)
    assert not np.array_equal(T5Masker(TOK, seed=2)(ids, 7).text_enc, a(ids, 7).text_enc)


def test_long_sequence_cut_to_510(proteins) -> None:
    long = next(p for p in proteins if len(p) > 600)
    s = T5Masker(TOK)(long, 0)
    assert np.array_equal(unmask(s, TOK), long[:510])
    assert len(s.labels) == 1 + 2 * round(0.15 * 510)


def test_rostlab_layout(proteins) -> None:
    tok = ProteinTokenizer.for_layout("rostlab")
    ids = tok.encode_residues(TOK.decode(proteins[3]).translate(str.maketrans("UZOB", "XXXX")))
    s = T5Masker(tok, seed=5)(ids, 0)
    assert s.text_dec[0] == tok.decoder_start_id == tok.pad_id
    assert s.text_enc[-1] == tok.eos_id and s.labels[-1] == tok.eos_id
    assert s.labels[0] == tok.sentinel_ids[0] == 127
    assert np.array_equal(unmask(s, tok), ids[:510])


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="sentinels are collapsed"):
        T5Masker(ProteinTokenizer(sentinels="collapsed"))
    most = max(1, round(0.15 * 510))
    with pytest.raises(ConfigError) as exc:
        T5Masker(TOK, seq_length_dec=128)
    assert str(exc.value) == (
        f"seq_length_dec 128 is too short: a sample of 510 tokens with masked_lm_prob 0.15 has up to {most} "
        f"masked tokens in {most} spans, so the decoder needs {2 * most + 1} positions (masked + sentinels + "
        "BOS/EOS)"
    )
    with pytest.raises(ConfigError, match="up to 128 spans per sample .* only 96 sentinels"):
        T5Masker(TOK, seq_length=1024, seq_length_dec=512, masked_lm_prob=0.125)


def test_collate_dynamic_and_fixed(proteins) -> None:
    masker = T5Masker(TOK, seed=2)
    samples = [masker(p, i) for i, p in enumerate(proteins[:5])]
    dyn = collate_t5(samples, TOK.pad_id)
    enc_len, dec_len = max(len(s.text_enc) for s in samples), max(len(s.text_dec) for s in samples)
    assert dyn["text_enc"].shape == (5, enc_len) and dyn["labels"].shape == (5, dec_len)
    fixed = collate_t5(samples, TOK.pad_id, 512, 256)
    assert fixed["text_enc"].shape == (5, 512) and fixed["text_dec"].shape == (5, 256)
    for i, s in enumerate(samples):
        assert fixed["enc_mask"][i].sum() == len(s.text_enc)
        assert fixed["loss_mask"][i].sum() == len(s.labels) == fixed["dec_mask"][i].sum()
        assert fixed["labels"][i, : len(s.labels)].tolist() == s.labels.tolist()
        assert (fixed["labels"][i, len(s.labels) :] == TOK.pad_id).all()
        assert fixed["text_enc"][i, :enc_len].tolist() == dyn["text_enc"][i].tolist()
    with pytest.raises(ConfigError, match="more than seq_length 100"):
        collate_t5(samples, TOK.pad_id, 100, 256)


# --------------------------------------------------------------------------- denoise and mixed objectives
@pytest.mark.parametrize("layout", ["prott5nv", "rostlab"])
def test_denoise_layout_and_rates(proteins, layout: str) -> None:
    """Rostlab's objective: 15% of residues corrupted in place (90% mask token, 10% a random standard
    residue), the decoder rebuilds every token; `corrupted` marks exactly the corrupted positions."""
    tok = TOK if layout == "prott5nv" else ProteinTokenizer.for_layout("rostlab")
    mask_id = tok.mask_id if tok.mask_id is not None else tok.sentinel_ids[0]
    masker = build_masker("denoise", tok, seed=3)
    assert isinstance(masker, DenoiseMasker)
    standard = {tok.token_to_id(a) for a in "ACDEFGHIKLMNPQRSTVWY"}
    corrupted = masked = replaced = total = 0
    for i, p in enumerate(proteins[:300]):
        ids = tok.encode_residues(TOK.decode(p).translate(str.maketrans("UZOB", "XXXX")))
        s = masker(ids, i)
        tokens = ids[:510]
        enc = s.text_enc[:-1] if tok.add_eos else s.text_enc
        assert (s.text_enc[-1] == tok.eos_id) == tok.add_eos
        assert len(enc) == len(tokens)  # corrupted in place: the encoder input keeps its length
        assert s.labels.tolist() == [*tokens.tolist(), tok.eos_id]
        assert s.text_dec.tolist() == [masker.decoder_start_id, *tokens.tolist()]
        changed = enc != tokens
        where = s.corrupted[:-1]
        assert not s.corrupted[-1] and (changed <= where).all()  # only corrupted positions differ
        assert where.sum() == max(1, round(0.15 * len(tokens)))
        assert set(enc[where & (enc != mask_id)].tolist()) <= standard
        assert (enc[~where] == tokens[~where]).all()
        assert s.encoder_labels.tolist() == [*tokens.tolist(), *([-100] * (len(s.text_enc) - len(tokens)))]
        corrupted += int(where.sum())
        masked += int((enc[where] == mask_id).sum())
        replaced += int((enc[where] != mask_id).sum())
        total += len(tokens)
    assert abs(corrupted / total - 0.15) <= 0.005
    assert abs(replaced / corrupted - 0.1) <= 0.02 and masked + replaced == corrupted


def test_span_samples_mark_their_masked_residues(proteins) -> None:
    s = T5Masker(TOK, seed=4)(proteins[1], 0)
    sentinels = np.isin(s.labels, TOK.sentinel_ids)
    assert s.corrupted.tolist() == (~sentinels & (s.labels != TOK.eos_id)).tolist()


def test_mixed_draws_each_sample_from_one_objective(proteins) -> None:
    masker = build_masker("mixed", TOK, seed=9, denoise_fraction=0.5)
    assert isinstance(masker, MixedMasker)
    span, denoise = build_masker("span", TOK, seed=9), build_masker("denoise", TOK, seed=9)
    kinds = []
    for i, p in enumerate(proteins[:200]):
        s = masker(p, i, epoch=2)
        expected = (denoise if masker.is_denoise(i, 2) else span)(p, i, 2)
        assert s.text_enc.tolist() == expected.text_enc.tolist() and s.labels.tolist() == expected.labels.tolist()
        kinds.append(masker.is_denoise(i, 2))
    assert 80 <= sum(kinds) <= 120  # about half
    assert not any(build_masker("mixed", TOK, denoise_fraction=0.0).is_denoise(i) for i in range(50))


def test_objective_refusals() -> None:
    with pytest.raises(ConfigError, match="objective 'bart': choose one of span, denoise, mixed"):
        build_masker("bart", TOK)
    with pytest.raises(ConfigError, match="seq_length_dec 256 is too short for the denoise objective: .* needs 511"):
        build_masker("denoise", TOK, seq_length_dec=256)


def test_collate_carries_corrupted(proteins) -> None:
    masker = build_masker("mixed", TOK, seed=1)
    samples = [masker(p, i) for i, p in enumerate(proteins[:6])]
    batch = collate_t5(samples, TOK.pad_id)
    for i, s in enumerate(samples):
        assert batch["corrupted"][i, : len(s.labels)].tolist() == s.corrupted.tolist()
        assert not batch["corrupted"][i, len(s.labels) :].any()
