"""The BioNeMo-style Python API: seqs_to_hiddens / hiddens_to_embedding / seqs_to_embedding."""

from __future__ import annotations

import pytest
import torch

import prott5nv
from prott5nv.api import ProtT5nv
from prott5nv.errors import ConfigError, InvalidSequenceError, SequenceTooLongError
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer


def test_hiddens_positions_are_residues(tiny_model, real_proteins):
    seqs = [s for _, s in real_proteins[:3]]
    hiddens, mask = tiny_model.seqs_to_hiddens(seqs)
    assert hiddens.shape == (3, max(map(len, seqs)), 64) and hiddens.dtype == torch.float32
    assert mask.sum(1).tolist() == [len(s) for s in seqs]
    # position j is residue j: the encoder output of the same ids computed directly
    ids = torch.from_numpy(tiny_model.tokenizer.encode(seqs[0]))[None]
    with torch.no_grad():
        direct = tiny_model.model.encode(ids)[0]
    torch.testing.assert_close(hiddens[0, : len(seqs[0])], direct, atol=1e-5, rtol=1e-5)
    assert torch.all(hiddens[~mask] == 0)


def test_embedding_is_mean_over_real_residues(tiny_model, real_proteins):
    seqs = [s for _, s in real_proteins[:4]]
    hiddens, mask = tiny_model.seqs_to_hiddens(seqs)
    emb = tiny_model.hiddens_to_embedding(hiddens, mask)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(emb[i], hiddens[i, : len(s)].mean(0))
    torch.testing.assert_close(tiny_model.seqs_to_embedding(seqs), emb)
    # batch invariance: alone == batched
    torch.testing.assert_close(tiny_model.seqs_to_embedding(seqs[1:2])[0], emb[1], atol=1e-5, rtol=1e-5)


def test_rostlab_models_drop_the_eos_position(real_proteins):
    torch.manual_seed(0)
    cfg = preset("tiny").replace(family="t5", activation="relu")
    api = ProtT5nv(T5Model(cfg).eval(), ProteinTokenizer.for_layout("rostlab"))
    seqs = [s for _, s in real_proteins[:2]]
    hiddens, mask = api.seqs_to_hiddens(seqs)
    assert hiddens.shape[1] == max(map(len, seqs)) and mask.sum(1).tolist() == [len(s) for s in seqs]
    ids = torch.from_numpy(api.tokenizer.encode(seqs[0]))[None]  # residues + </s>
    with torch.no_grad():
        direct = api.model.encode(ids)[0, :-1]
    torch.testing.assert_close(hiddens[0, : len(seqs[0])], direct, atol=1e-5, rtol=1e-5)


def test_load_bundled_and_errors():
    model = prott5nv.load("prott5nv-demo")
    assert model.max_length == 512 and model.embedding_dim == model.config.d_model
    with pytest.raises(InvalidSequenceError, match="record 'sequence 2': unknown residue 'J'"):
        model.seqs_to_embedding(["MKT", "MJK"])
    with pytest.raises(SequenceTooLongError, match=r"1 sequence\(s\) longer than the model's maximum of 512"):
        model.seqs_to_embedding(["M" * 513])
    with pytest.raises(ConfigError, match="at least one sequence"):
        model.seqs_to_hiddens([])
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        prott5nv.load("prott5nv-demo", dtype="float16")


def test_bfloat16_close_to_float32(real_proteins):
    seqs = [s for _, s in real_proteins]
    ref = prott5nv.load("prott5nv-demo").seqs_to_embedding(seqs)
    half = prott5nv.load("prott5nv-demo", dtype="bfloat16").seqs_to_embedding(seqs)
    assert torch.nn.functional.cosine_similarity(ref, half).min().item() > 0.999
