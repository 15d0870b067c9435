""".nemo import: archives written by an independent writer that follows NeMo's documented layout.

The writer below knows nothing of prott5nv.checkpoint: it names every tensor the way NeMo's Megatron T5 does
(docs/checkpoints.md), interleaves the fused projections per head, writes a NeMo-style
``model_config.yaml`` and a SentencePiece ``.model`` protobuf built by hand (conftest), and packs them in a tar.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tarfile
import tempfile

import pytest
import torch
import yaml

from prott5nv.checkpoint import load_checkpoint
from prott5nv.checkpoint.nemo import load_nemo
from prott5nv.checkpoint.sentencepiece import parse_model
from prott5nv.cli import main as cli_main
from prott5nv.errors import CheckpointError
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import PROTT5NV_PIECES, ProteinTokenizer, require_distinct_sentinels

SPM_NAME = "8f3a_protein_sequence_sentencepiece.model"
VOCAB_NAME = "8f3a_protein_sequence_sentencepiece.vocab"


# ----------------------------------------------------------------------------------- the writer
def megatron_state(model: T5Model, *, qkv_layout: str = "heads", amp_o2: bool = False,
                   decoder_embedding: bool = True, ln_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """NeMo Megatron T5 state dict of a prott5nv megatron-family model.

    qkv_layout "heads": NeMo's default per-head interleave [heads, n, hd]; "legacy": [n, heads, hd]."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    root = "enc_dec_model.module." if amp_o2 else "enc_dec_model."
    h, hd = cfg.num_heads, cfg.d_kv

    def fused(t: torch.Tensor, n: int) -> torch.Tensor:
        if qkv_layout == "legacy":
            return t.clone()
        rest = t.shape[1:]
        return t.reshape(n, h, hd, *rest).permute(1, 0, 2, *range(3, 3 + len(rest))).reshape(t.shape).clone()

    out = {
        root + "encoder_embedding.word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
        root + "encoder_embedding.position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
        root + "tokens_head.bias": sd["lm_head_bias"],
    }
    if decoder_embedding:
        out[root + "decoder_embedding.word_embeddings.weight"] = sd["embeddings.word_embeddings.weight"]
        out[root + "decoder_embedding.position_embeddings.weight"] = sd["embeddings.position_embeddings.weight"]
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        nemo = f"{root}enc_dec_model.{stack}.model"
        for i in range(n):
            o, t = f"{stack}.blocks.{i}", f"{nemo}.layers.{i}"
            names = {
                "self_attn_norm": "input_layernorm",
                "self_attention.o": "self_attention.dense",
                "mlp.wi": "mlp.dense_h_to_4h",
                "mlp.wo": "mlp.dense_4h_to_h",
            }
            if stack == "decoder":  # decoder: post_attention_layernorm feeds the cross-attention
                names |= {
                    "cross_attn_norm": "post_attention_layernorm",
                    "cross_attention.q": "inter_attention.query",
                    "cross_attention.o": "inter_attention.dense",
                    "mlp_norm": "post_inter_attention_layernorm",
                }
            else:  # encoder: post_attention_layernorm feeds the MLP
                names["mlp_norm"] = "post_attention_layernorm"
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    v = sd[f"{o}.{ours}.{p}"]
                    if ours.endswith("norm") and p == "weight":
                        v = v - ln_offset
                    out[f"{t}.{theirs}.{p}"] = v
            for p in ("weight", "bias"):
                out[f"{t}.self_attention.query_key_value.{p}"] = fused(sd[f"{o}.self_attention.qkv.{p}"], 3)
                if stack == "decoder":
                    out[f"{t}.inter_attention.key_value.{p}"] = fused(sd[f"{o}.cross_attention.kv.{p}"], 2)
        for p in ("weight", "bias"):
            v = sd[f"{stack}.final_layer_norm.{p}"]
            out[f"{nemo}.final_layernorm.{p}"] = v - ln_offset if p == "weight" else v
    return out


def nemo_config(model: T5Model, **overrides) -> dict:
    """An old-style (shared encoder/decoder settings) NeMo Megatron T5 config like BioNeMo ProtT5nv's."""
    cfg = model.config
    d = {
        "precision": 16, "micro_batch_size": 12, "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1, "megatron_amp_O2": False, "seq_length": cfg.seq_length,
        "max_position_embeddings": cfg.max_position_embeddings, "num_layers": cfg.num_layers,
        "hidden_size": cfg.d_model, "ffn_hidden_size": cfg.d_ff, "num_attention_heads": cfg.num_heads,
        "init_method_std": 0.015, "hidden_dropout": 0.1, "attention_dropout": 0.1, "kv_channels": None,
        "apply_query_key_layer_scaling": True, "layernorm_epsilon": cfg.layer_norm_epsilon,
        "make_vocab_size_divisible_by": 128, "pre_process": True, "post_process": True,
        "persist_layer_norm": True, "bias_activation_fusion": True, "masked_softmax_fusion": True,
        "bias_dropout_add_fusion": True, "bias": True, "normalization": "layernorm",
        "encoder_arch": "transformer", "decoder_arch": "transformer", "activation": "gelu",
        "headscale": False, "transformer_block_type": "pre_ln",
        "position_embedding_type": "learned_absolute", "share_token_embeddings": True,
        "share_decoder_tokens_head_embeddings": True,
        "tokenizer": {"library": "sentencepiece", "type": None, "model": f"nemo:{SPM_NAME}",
                      "vocab_file": f"nemo:{VOCAB_NAME}", "merge_file": None, "num_sentinel_tokens": 96},
        "data": {"seq_length_dec": cfg.seq_length_dec, "masked_lm_prob": 0.15, "max_ngram_size": 1},
        "optim": {"name": "fused_adam", "lr": 1e-4},
        "target": "bionemo.model.protein.prott5nv.prott5_model.ProtT5nvModel",
        "nemo_version": "1.11.0",
    }  # fmt: skip
    for k, v in overrides.items():
        if v is None and k in d:
            del d[k]
        else:
            d[k] = v
    return d


def pack_nemo(path, model: T5Model, config: dict | None = None, *, spm_writer, state=None,
              prefix: str = "./", pieces=PROTT5NV_PIECES, members: dict[str, bytes] | None = None,
              gz: bool = False, vocab_text: bool = True, spm: bool = True):
    """Pack a .nemo archive the way NeMo's save_to does (members under ./ in a tar)."""
    config = nemo_config(model) if config is None else config
    state = megatron_state(model) if state is None else state
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {"model_config.yaml": yaml.safe_dump(config).encode(), "model_weights.ckpt": buf.getvalue()}
    if spm:
        files[SPM_NAME] = spm_writer(pieces)
    if vocab_text:
        files[VOCAB_NAME] = "".join(f"{p}\t{-i}\n" for i, p in enumerate(pieces)).encode()
    files.update(members or {})
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def write_nemo(spm_model_bytes):
    """:func:`pack_nemo` with conftest's hand-written SentencePiece model writer."""
    return functools.partial(pack_nemo, spm_writer=spm_model_bytes)


def randomized(config) -> T5Model:
    """A megatron model whose every parameter (biases, norm gains too) is random, so that any mix-up of
    tensors -- e.g. two layer norms swapped -- changes the outputs."""
    torch.manual_seed(7)
    model = T5Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1) + (1.0 if "norm.weight" in name
                                                                              else 0.0))
    return model


@pytest.fixture(scope="module")
def source_model() -> T5Model:
    return randomized(preset("tiny"))


@pytest.fixture(scope="module")
def batch(real_proteins):
    tok = ProteinTokenizer()
    seqs = [s[:60] for _, s in real_proteins[:5]]
    seqs[1], seqs[3] = seqs[1][:23], seqs[3][:41]  # mixed lengths -> padding
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_id)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(tok.encode(s))
        mask[i, : len(s)] = 1
    dec = torch.cat([torch.full((len(seqs), 1), tok.bos_id), ids[:, :12]], dim=1)
    return ids, mask, dec


def outputs(model: T5Model, batch):
    ids, mask, dec = batch
    model.eval()
    with torch.no_grad():
        enc = model.encode(ids, mask)
        return enc * mask[..., None], model.lm_logits(model.decode(dec, enc, mask))


def assert_same(a: T5Model, b: T5Model, batch, atol: float = 1e-6):
    for x, y in zip(outputs(a, batch), outputs(b, batch), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


# -------------------------------------------------------------------------------------- parity
def test_load_identical_outputs(write_nemo, tmp_path, source_model, batch, caplog):
    path = write_nemo(tmp_path / "prott5nv.nemo", source_model)
    with caplog.at_level(logging.INFO, logger="prott5nv.checkpoint.nemo"):
        model, tok = load_nemo(path)
    cfg = model.config
    assert (cfg.family, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv) == ("megatron", 64, 256, 4, 16)
    assert (cfg.num_layers, cfg.num_decoder_layers, cfg.vocab_size, cfg.max_position_embeddings) == (2, 2, 128, 512)
    assert cfg.activation == "gelu_tanh" and cfg.layer_norm_epsilon == 1e-5 and cfg.seq_length_dec == 256
    assert tok.layout == "prott5nv" and tok.sentinels == "distinct" and tok.sentinel(0) == 32
    assert cfg.extra["nemo"]["sentinels"] == "distinct" and "1.11" in cfg.extra["nemo"]["sentinel_reason"]
    assert "sentinel layout distinct" in caplog.text
    assert_same(model, source_model, batch)


def test_load_checkpoint_dispatches_and_no_file_is_extracted(write_nemo, tmp_path, source_model, batch, monkeypatch):
    path = write_nemo(tmp_path / "m.nemo", source_model)

    def refuse(*a, **k):
        raise AssertionError("the loader must not extract archive members to disk")

    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    model, _ = load_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["m.nemo"]
    assert set(os.listdir(tempfile.gettempdir())) - tmp_before == set()
    assert not model.training
    assert_same(model, source_model, batch)


def test_wrong_head_layout_changes_numerics(write_nemo, tmp_path, source_model, batch):
    """[3, heads, hd] rows in a checkpoint that does not declare megatron_legacy load 'fine' but compute
    something else: the per-head interleave is really what the loader undoes."""
    state = megatron_state(source_model, qkv_layout="legacy")
    model, _ = load_nemo(write_nemo(tmp_path / "wrong.nemo", source_model, state=state))
    enc_a, logits_a = outputs(model, batch)
    enc_b, logits_b = outputs(source_model, batch)
    assert (enc_a - enc_b).abs().max() > 1e-2 and (logits_a - logits_b).abs().max() > 1e-2


def test_megatron_legacy_layout(write_nemo, tmp_path, source_model, batch):
    config = nemo_config(source_model, megatron_legacy=True)
    state = megatron_state(source_model, qkv_layout="legacy")
    model, _ = load_nemo(write_nemo(tmp_path / "legacy.nemo", source_model, config, state=state))
    assert model.config.extra["nemo"]["megatron_legacy"] is True
    assert_same(model, source_model, batch)


def test_amp_o2_module_prefix_gzip_and_plain_member_names(write_nemo, tmp_path, source_model, batch):
    config = nemo_config(source_model, megatron_amp_O2=True)
    state = megatron_state(source_model, amp_o2=True, decoder_embedding=False)
    path = write_nemo(tmp_path / "o2.nemo", source_model, config, state=state, prefix="", gz=True)
    model, _ = load_nemo(path)
    assert_same(model, source_model, batch)


def test_new_style_sections_erf_gelu_layernorm1p_and_vocab_file(write_nemo, tmp_path, batch):
    """Encoder/decoder sections (newer NeMo), unfused exact GELU, layernorm1p gains, the tokenizer from the
    .vocab text, and an encoder deeper than the decoder."""
    source = randomized(preset("tiny").replace(activation="gelu", num_layers=3, num_decoder_layers=1))
    arch = {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 4,
            "kv_channels": 16, "activation": "gelu", "bias_activation_fusion": False,
            "normalization": "layernorm1p", "layernorm_epsilon": 1e-5, "arch": "transformer"}  # fmt: skip
    config = nemo_config(source, num_layers=None, hidden_size=None, ffn_hidden_size=None,
                         num_attention_heads=None, activation=None, bias_activation_fusion=None,
                         normalization=None, encoder=arch, decoder={**arch, "num_layers": 1})  # fmt: skip
    config["tokenizer"]["model"] = None
    state = megatron_state(source, ln_offset=1.0)
    model, _ = load_nemo(write_nemo(tmp_path / "new.nemo", source, config, state=state, spm=False))
    assert model.config.activation == "gelu" and (model.config.num_layers, model.config.num_decoder_layers) == (3, 1)
    assert_same(model, source, batch)


@pytest.mark.parametrize(
    ("fusion_keys", "activation"),
    [({"bias_activation_fusion": None, "bias_gelu_fusion": False}, "gelu"),  # in-between configs
     ({"bias_activation_fusion": None}, "gelu_tanh"),  # oldest configs: fusion always on
     ({"bias_activation_fusion": False, "openai_gelu": True}, "gelu_tanh")],
)  # fmt: skip
def test_gelu_form_from_config(write_nemo, tmp_path, source_model, fusion_keys, activation):
    path = write_nemo(tmp_path / "g.nemo", source_model, nemo_config(source_model, **fusion_keys))
    assert load_nemo(path)[0].config.activation == activation


# ------------------------------------------------------------------------------------- sentinels
def test_sentinels_collapsed_by_nemo_version(write_nemo, tmp_path, source_model):
    path = write_nemo(tmp_path / "v122.nemo", source_model, nemo_config(source_model, nemo_version="1.22.0"))
    model, tok = load_nemo(path)
    assert tok.sentinels == "collapsed" and tok.sentinel(5) == tok.unk_id == 0
    assert model.config.extra["nemo"]["sentinels"] == "collapsed"
    with pytest.raises(CheckpointError, match="score: .*onto <unk>.*Embeddings still work"):
        require_distinct_sentinels(tok, "score")
    _, tok = load_nemo(path, sentinels="distinct")  # the caller knows better
    assert tok.sentinel(5) == 37
    require_distinct_sentinels(tok, "score")


def test_sentinels_collapsed_by_embedding_rows(write_nemo, tmp_path):
    """With make_vocab_size_divisible_by 8, NeMo >= 1.13 builds 32 rows and <= 1.12 builds 128."""
    source = randomized(preset("tiny").replace(vocab_size=32))
    config = nemo_config(source, make_vocab_size_divisible_by=8, nemo_version=None)
    model, tok = load_nemo(write_nemo(tmp_path / "r.nemo", source, config))
    assert tok.sentinels == "collapsed" and tok.vocab_size == 32 == model.config.vocab_size
    assert "rows" in model.config.extra["nemo"]["sentinel_reason"]


def test_sentinels_undecidable_defaults_to_distinct_with_warning(write_nemo, tmp_path, source_model, caplog):
    path = write_nemo(tmp_path / "u.nemo", source_model, nemo_config(source_model, nemo_version=None))
    with caplog.at_level(logging.WARNING, logger="prott5nv.checkpoint.nemo"):
        _, tok = load_nemo(path)
    assert tok.sentinels == "distinct" and "undecidable" in caplog.text


# -------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"tensor_model_parallel_size": 2}, "tensor_model_parallel_size=2"),
     ({"pipeline_model_parallel_size": 2}, "pipeline_model_parallel_size=2"),
     ({"activation": "swiglu", "bias_activation_fusion": False}, "activation 'swiglu'"),
     ({"activation": "geglu"}, "activation 'geglu'"),
     ({"normalization": "rmsnorm"}, "normalization 'rmsnorm'"),
     ({"position_embedding_type": "relative"}, "position_embedding_type='relative'"),
     ({"share_decoder_tokens_head_embeddings": False}, "share_decoder_tokens_head_embeddings=False"),
     ({"share_token_embeddings": False}, "share_token_embeddings=False"),
     ({"headscale": True}, "headscale"),
     ({"transformer_block_type": "post_ln"}, "post_ln"),
     ({"bias": False, "bias_activation_fusion": False}, "bias=False"),
     ({"tokenizer": {"library": "megatron", "model": None}}, "library 'megatron'")],
)  # fmt: skip
def test_refuses_unrepresentable_configs(write_nemo, tmp_path, source_model, overrides, message):
    path = write_nemo(tmp_path / "bad.nemo", source_model, nemo_config(source_model, **overrides))
    with pytest.raises(CheckpointError, match=rf"bad\.nemo.*{message}"):
        load_nemo(path)


def test_refuses_model_parallel_shards(write_nemo, tmp_path, source_model):
    shard = {"mp_rank_00/model_weights.ckpt": b"x", "mp_rank_01/model_weights.ckpt": b"y"}
    path = write_nemo(tmp_path / "tp.nemo", source_model, members=shard)
    with pytest.raises(CheckpointError, match="model-parallel shards.*mp_rank_00"):
        load_nemo(path)


def test_refuses_wrong_vocabulary_naming_the_difference(write_nemo, tmp_path, source_model):
    pieces = list(PROTT5NV_PIECES)
    pieces[5], pieces[6] = pieces[6], pieces[5]
    path = write_nemo(tmp_path / "v.nemo", source_model, pieces=pieces)
    with pytest.raises(CheckpointError, match=r"not the ProtT5nv SentencePiece vocabulary: id 5: 'A' \(expected 'L'\)"):
        load_nemo(path)


def test_refuses_missing_tokenizer_file(write_nemo, tmp_path, source_model):
    path = write_nemo(tmp_path / "t.nemo", source_model, spm=False, vocab_text=False)
    with pytest.raises(CheckpointError, match="tokenizer file .* is not in the archive"):
        load_nemo(path)


def test_refuses_pickled_code(write_nemo, tmp_path, source_model):
    state = megatron_state(source_model)
    state["evil"] = tarfile.TarInfo("x")  # an arbitrary object: needs unpickling code, must be refused
    path = write_nemo(tmp_path / "p.nemo", source_model, state=state)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_nemo(path)


def test_refuses_untied_decoder_embedding_and_unknown_keys(write_nemo, tmp_path, source_model):
    state = megatron_state(source_model)
    state["enc_dec_model.decoder_embedding.word_embeddings.weight"] = torch.randn(128, 64)
    with pytest.raises(CheckpointError, match="decoder has its own embeddings"):
        load_nemo(write_nemo(tmp_path / "d.nemo", source_model, state=state))
    state = megatron_state(source_model)
    state["enc_dec_model.encoder_relative_position_embedding.weight"] = torch.randn(32, 4)
    with pytest.raises(CheckpointError, match="unexpected: .*relative_position"):
        load_nemo(write_nemo(tmp_path / "k.nemo", source_model, state=state))


def test_not_a_nemo_archive(tmp_path):
    bad = tmp_path / "x.nemo"
    bad.write_bytes(b"not a tar")
    with pytest.raises(CheckpointError, match="x.nemo"):
        load_nemo(bad)


# ------------------------------------------------------------------------------- spm + CLI
def test_hand_written_spm_matches_real_sentencepiece(spm_model_bytes):
    import sentencepiece as spm

    data = spm_model_bytes(PROTT5NV_PIECES)
    proc = spm.SentencePieceProcessor(model_proto=data)
    assert [proc.id_to_piece(i) for i in range(proc.get_piece_size())] == list(PROTT5NV_PIECES)
    assert [p for p, _, _ in parse_model(data)] == list(PROTT5NV_PIECES)


def test_reader_parses_a_trained_sentencepiece_model():
    import sentencepiece as spm

    residues = PROTT5NV_PIECES[5:]
    lines = [r * (5 + 2 * (len(residues) - i)) for i, r in enumerate(residues) for _ in range(10)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="char", vocab_size=30,
        user_defined_symbols=["<mask>"], unk_id=0, bos_id=1, eos_id=2, pad_id=3, add_dummy_prefix=False,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    parsed = parse_model(buf.getvalue())
    assert [p for p, _, _ in parsed] == list(PROTT5NV_PIECES)
    assert [t for _, _, t in parsed[:6]] == [2, 3, 3, 3, 4, 1]  # unk, control x3, user-defined, normal


def test_convert_cli_nemo_to_native_and_refuses_hf(write_nemo, tmp_path, source_model, batch, capsys):
    src = write_nemo(tmp_path / "m.nemo", source_model)
    assert cli_main(["convert", str(src), str(tmp_path / "native")]) == 0
    model, tok = load_checkpoint(tmp_path / "native")
    assert tok.sentinels == "distinct" and model.config.extra["nemo"]["sentinels"] == "distinct"
    assert_same(model, source_model, batch)
    assert cli_main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "cannot export a megatron-family model to HF T5" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
