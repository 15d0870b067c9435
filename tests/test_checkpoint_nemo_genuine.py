"""A `.nemo` archive written by NeMo 1.22's own ``save_to()`` and NeMo's own outputs on it (tests/data/nemo_genuine,
README there): encoder states, mean embeddings, teacher-forced decoder logits for both sentinel layouts, and
greedy decoding. Unlike test_checkpoint_nemo.py (our own writer of NeMo's layout), nothing here was written
by prott5nv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prott5nv.api import ProtT5nv, load
from prott5nv.checkpoint.nemo import load_nemo
from prott5nv.cli import main as cli_main
from prott5nv.errors import CheckpointError
from prott5nv.model.generate import GenerationConfig, generate

DATA = Path(__file__).parent / "data" / "nemo_genuine"
ARCHIVE = DATA / "tiny.nemo"
REF = json.loads((DATA / "nemo_ref.json").read_text())
NEMO_VOCAB = REF["vocab_size"]  # NeMo's tokenizer.vocab_size (32): decode() never emits ids >= this
LAYOUTS = ("collapsed", "distinct")


def npy(name: str) -> np.ndarray:
    return np.load(DATA / f"{name}.npy")


@pytest.fixture(scope="module")
def models() -> dict[str, tuple]:
    out = {}
    for layout in LAYOUTS:  # the archive is collapsed, as NeMo 1.22 writes it; "distinct" is forced
        model, tok = load_nemo(ARCHIVE, sentinels=None if layout == "collapsed" else layout)
        out[layout] = (model.eval(), tok)
    return out


def test_archive_is_read_as_nemo_wrote_it(models):
    model, tok = models["collapsed"]
    assert model.config.extra["nemo"]["nemo_version"] == REF["nemo_version"] == "1.22.0"
    assert tok.sentinels == "collapsed" and tok.sentinel_ids[:5] == REF["nemo_sentinel_ids_first5"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (REF["pad_id"], REF["bos_id"], REF["eos_id"])
    assert model.config.vocab_size == tok.vocab_size == REF["padded_vocab_size"]
    assert tok.real_vocab_size == NEMO_VOCAB
    shapes = json.loads((DATA / "state_dict_shapes.json").read_text())
    assert sum(int(np.prod(s)) for k, s in shapes.items() if "decoder_embedding" not in k) == model.num_parameters()
    for seq, ids in zip(REF["seqs"], REF["ids"], strict=True):
        assert tok.encode(seq).tolist() == ids  # NeMo's text_to_ids
    _, distinct = models["distinct"]
    assert distinct.sentinel_ids[0] == 32 and distinct.real_vocab_size == 128


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_encoder_hiddens_equal_nemo(models, dtype, tol):
    model = models["collapsed"][0].to(dtype)
    try:
        ref = npy("nemo_encoder_hiddens" + ("_f64" if dtype == torch.float64 else ""))
        mask = npy("nemo_enc_mask").astype(bool)
        with torch.no_grad():
            ours = model.encode(torch.from_numpy(npy("nemo_enc_tokens")), torch.from_numpy(npy("nemo_enc_mask")))
        assert ours.dtype == dtype
        diff = np.abs(ours.numpy() - ref)[mask]  # NeMo leaves non-zero values at padded positions
        assert diff.max() < tol
    finally:
        model.float()


def test_mean_embeddings_equal_nemo(models):
    model, tok = models["collapsed"]
    wrapped = ProtT5nv(model, tok)
    emb = wrapped.seqs_to_embedding(REF["seqs"], REF["names"]).numpy()
    np.testing.assert_allclose(emb, npy("nemo_embeddings_mean"), rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_forced_logits_equal_nemo(models, layout, dtype):
    model, tok = models[layout]
    model = model.to(dtype)
    try:
        enc = npy(f"nemo_{layout}_enc_tokens")
        dec = npy(f"nemo_{layout}_dec_tokens")
        if layout == "distinct":  # the masked positions hold sentinels 0..5, as our tokenizer numbers them
            assert sorted(set(enc[enc >= 32].tolist())) == tok.sentinel_ids[:6]
        else:
            assert set(enc[:, REF["masked_positions"][0]].ravel().tolist()) == {tok.sentinel(0)}
        with torch.no_grad():
            logits = model(torch.from_numpy(enc), torch.from_numpy(npy("nemo_enc_mask")), torch.from_numpy(dec))
        keep = npy(f"nemo_{layout}_dec_mask").astype(bool)
        if dtype == torch.float64:
            ref = npy(f"nemo_{layout}_logits_f64")
            np.testing.assert_allclose(logits.numpy()[keep], ref[keep], rtol=0, atol=1e-10)
        else:
            ref = npy(f"nemo_{layout}_logits")
            diff = np.abs(logits.numpy()[keep] - ref[keep]).max()
            assert diff < 5e-5 * np.abs(ref).max()  # fp32: ~2e-5 of the largest logit measured
    finally:
        model.float()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_nemo(models, layout, speculative):
    """NeMo's decode(): 16 steps after BOS, no stop at EOS, ids >= tokenizer.vocab_size (32) masked."""
    model, tok = models[layout]
    ref = npy(f"nemo_{layout}_greedy")
    cfg = GenerationConfig(max_new_tokens=ref.shape[1] - 1, speculative=speculative, vocab_limit=NEMO_VOCAB,
                           speculation_min_bytes=0)  # fmt: skip
    enc = torch.from_numpy(npy(f"nemo_{layout}_enc_tokens"))
    out = generate(model, enc, torch.from_numpy(npy("nemo_enc_mask")), cfg,
                   decoder_start_id=tok.decoder_start_id, eos_id=-1, pad_id=tok.pad_id)  # fmt: skip
    assert out.sequences.tolist() == ref[:, 1:].tolist()
    np.testing.assert_allclose(out.token_logprobs.numpy(), npy(f"nemo_{layout}_greedy_logprobs"), atol=5e-4)


@pytest.mark.parametrize(
    "settings",
    [{"speculation_min_bytes": 0}, {"speculative": False}, {"num_beams": 3, "num_return_sequences": 3},
     {"do_sample": True, "num_return_sequences": 4, "temperature": 3.0}],
    ids=["speculative", "greedy", "beam", "sample"],
)  # fmt: skip
def test_generation_never_emits_padding_rows(models, settings):
    """The collapsed archive's tokenizer has 32 ids; rows 32..127 of its table only pad (NeMo never emits
    them). Untrained-looking weights make those rows likely, so without the mask they would be chosen."""
    model, tok = models["collapsed"]
    wrapped = ProtT5nv(model, tok)
    with torch.no_grad():  # the padding rows' logits win unmasked: the mask is what keeps them out
        hidden, mask = wrapped.seqs_to_hiddens(REF["seqs"][:2])
        raw = generate(model, None, mask.long(), GenerationConfig(max_new_tokens=16, speculative=False),
                       decoder_start_id=1, eos_id=-1, pad_id=3, encoder_hidden=hidden)  # fmt: skip
    assert int(raw.sequences.max()) >= NEMO_VOCAB
    results = wrapped.generate(REF["seqs"][:2], seed=0, max_new_tokens=16, **settings)
    assert results and all("<unused_" not in g.target for g in results)
    texts = wrapped.hiddens_to_seq(hidden, mask, seed=0, max_new_tokens=16, **settings)
    assert all("<unused_" not in t for t in texts)


def test_vocab_limit_is_the_only_difference(models):
    """Masking removes ids, it does not change the scores of the others: where the unmasked argmax is a
    real token the tokens agree."""
    model, tok = models["distinct"]
    enc = torch.from_numpy(npy("nemo_distinct_enc_tokens"))
    mask = torch.from_numpy(npy("nemo_enc_mask"))
    kw = dict(decoder_start_id=1, eos_id=-1, pad_id=3)
    full = generate(model, enc, mask, GenerationConfig(max_new_tokens=1, speculative=False), **kw)
    cut = generate(model, enc, mask, GenerationConfig(max_new_tokens=1, speculative=False, vocab_limit=128), **kw)
    assert torch.equal(full.sequences, cut.sequences)
    with pytest.raises(Exception, match="vocab_limit"):
        GenerationConfig(vocab_limit=0).validate()


def test_collapsed_archive_refuses_masked_generation_and_names_the_flag(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="--sentinels distinct"):
        load(ARCHIVE).generate(["MKT<mask>LLV"])
    out = tmp_path / "out.tsv"
    assert cli_main(["generate", "-s", "MKT<mask>LLV", "--model", str(ARCHIVE), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--sentinels distinct" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_generate_to_stdout_prints_nothing_before_an_error(capsys):
    assert cli_main(["generate", "-s", "MKT<mask>LLV", "--model", str(ARCHIVE)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error:" in captured.err and "Traceback" not in captured.err


def test_cli_sentinels_flag_loads_collapsed_archive_as_distinct(tmp_path, capsys):
    out = tmp_path / "out.tsv"
    seq = REF["seqs"][0][:40]
    masked = seq[:4] + "<mask>" + seq[5:]
    args = ["generate", "-s", masked, "--model", str(ARCHIVE), "--max-new-tokens", "8", "-o", str(out)]
    assert cli_main([*args, "--sentinels", "distinct"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].split("\t") == ["id", "rank", "score", "target", "filled"] and len(rows) == 2
    assert "<unused_" not in rows[1]
    # infill and score take the flag too (the decoding commands)
    filled = tmp_path / "filled.fa"
    assert cli_main(["infill", "-s", masked, "--model", str(ARCHIVE), "--sentinels", "distinct",
                     "-o", str(filled)]) == 0  # fmt: skip
    lines = filled.read_text().splitlines()
    assert lines[0].startswith(">seq1 sample=1") and len("".join(lines[1:])) == len(seq)
    assert cli_main(["infill", "-s", masked, "--model", str(ARCHIVE), "-o", str(tmp_path / "x.fa")]) == 2
    assert "--sentinels distinct" in capsys.readouterr().err


def test_sentinels_option_on_other_formats(tiny_checkpoint):
    load(tiny_checkpoint, sentinels="distinct")  # repeats the native tokenizer's layout: accepted
    with pytest.raises(Exception, match="only be chosen for .nemo"):
        load(tiny_checkpoint, sentinels="collapsed")
    with pytest.raises(Exception, match="unknown sentinel layout"):
        load(ARCHIVE, sentinels="both")
