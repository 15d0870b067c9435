"""HF T5 import/export against transformers itself: random-weight HF models saved with `save_pretrained`,
loaded by prott5nv, must give the same encoder states and LM logits (<= 1e-5, fp32) on real proteins; and
what prott5nv exports must load in transformers with the same outputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers  # noqa: E402 - the test extra installs it; a missing install must fail, not skip
from safetensors.torch import load_file

from prott5nv.checkpoint import load_checkpoint
from prott5nv.checkpoint.hf import load_hf, save_hf
from prott5nv.cli import main as cli_main
from prott5nv.errors import CheckpointError
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ROSTLAB_PIECES, ProteinTokenizer

transformers.logging.set_verbosity_error()
HFConfig, T5EncoderModel, T5ForConditionalGeneration = (
    transformers.T5Config, transformers.T5EncoderModel, transformers.T5ForConditionalGeneration
)  # fmt: skip

SHAPES = {
    # d_kv * heads == d_model
    "small": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64},
    # Rostlab ProtT5-XL layout scaled down: relu, d_kv * heads (128) != d_model (64)
    "xl_scaled": {"d_model": 64, "d_kv": 32, "num_heads": 4, "d_ff": 128},
}
ATOL = 1e-5


def hf_model(cls, shape: str = "xl_scaled", seed: int = 0, **overrides):
    """A random-weight HF T5 (norm gains and position biases randomized too, so mix-ups show)."""
    settings = dict(
        vocab_size=128, num_layers=2, num_decoder_layers=2, feed_forward_proj="relu", layer_norm_epsilon=1e-6,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    cfg = HFConfig(**{**settings, **SHAPES[shape], **overrides})
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.3)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def batch(real_proteins):
    """Real proteins of mixed lengths encoded the Rostlab way (rare residues -> X, trailing </s>)."""
    tok = ProteinTokenizer.for_layout("rostlab")
    seqs = [s[:n] for (_, s), n in zip(real_proteins[:5], (70, 23, 55, 41, 64), strict=True)]
    encoded = [torch.from_numpy(tok.encode(s)) for s in seqs]
    ids = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=tok.pad_id)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(e) for e in encoded])[:, None]).long()
    dec = torch.cat([torch.full((len(seqs), 1), tok.decoder_start_id), ids[:, :12]], dim=1)
    return ids, mask, dec


def hf_outputs(model, batch):
    ids, mask, dec = batch
    with torch.no_grad():
        if isinstance(model, T5EncoderModel):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None], None
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        return out.encoder_last_hidden_state * mask[..., None], out.logits


def our_outputs(model: T5Model, batch):
    ids, mask, dec = batch
    model.eval()
    with torch.no_grad():
        enc = model.encode(ids, mask)
        logits = model.lm_logits(model.decode(dec, enc, mask)) if model.decoder is not None else None
        return enc * mask[..., None], logits


def assert_parity(ours: T5Model, hf, batch, atol: float = ATOL) -> None:
    (enc_a, log_a), (enc_b, log_b) = our_outputs(ours, batch), hf_outputs(hf, batch)
    torch.testing.assert_close(enc_a, enc_b, rtol=0, atol=atol)
    assert (log_a is None) == (log_b is None)
    if log_a is not None:
        torch.testing.assert_close(log_a, log_b, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cls", [T5EncoderModel, T5ForConditionalGeneration], ids=["encoder", "full"])
def test_import_parity(tmp_path, batch, shape, cls):
    hf = hf_model(cls, shape)
    hf.save_pretrained(tmp_path)
    model, tok = load_hf(tmp_path)
    cfg = model.config
    assert cfg.family == "t5" and cfg.activation == "relu" and cfg.tie_word_embeddings
    assert cfg.num_decoder_layers == (0 if cls is T5EncoderModel else 2)
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads) == tuple(SHAPES[shape][k] for k in ("d_model", "d_kv", "num_heads"))
    assert tok.layout == "rostlab"
    assert_parity(model, hf, batch)


def test_encoder_layers_are_transformers_hidden_states(tmp_path, batch):
    """Layer k (fair-esm's numbering) is transformers' ``hidden_states[k]``: 0 the embedding output, k block
    k's output, the last one after the final norm; -1 is that last one."""
    hf = hf_model(T5EncoderModel, num_layers=3)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    ids, mask, _ = batch
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = model.eval().encode_layers(ids, mask, model.config.encoder_layers([0, 1, 2, -1]))
    assert len(want) == len(got) == 4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a * mask[..., None], b * mask[..., None], rtol=0, atol=ATOL)


def test_load_checkpoint_dispatches_to_hf(tmp_path, batch):
    hf = hf_model(T5ForConditionalGeneration)
    hf.save_pretrained(tmp_path)
    model, _ = load_checkpoint(tmp_path)
    assert not model.training
    assert_parity(model, hf, batch)


def test_untied_lm_head(tmp_path, batch):
    hf = hf_model(T5ForConditionalGeneration, tie_word_embeddings=False)
    with torch.no_grad():  # transformers 5 ties the head at construction; give it its own matrix
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.05)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()  # what transformers makes of the files
    assert not torch.equal(hf.lm_head.weight, hf.shared.weight)
    model, _ = load_hf(tmp_path)
    assert not model.config.tie_word_embeddings
    assert_parity(model, hf, batch)


def test_unscaled_head_on_the_shared_table(tmp_path, batch):
    """transformers 5 ties lm_head to the word table even with tie_word_embeddings=False and only drops the
    output scaling (saved as scale_decoder_outputs=False, no lm_head.weight in the file)."""
    hf = hf_model(T5ForConditionalGeneration, "small", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    assert not model.config.tie_word_embeddings
    assert_parity(model, hf, batch)


def test_gated_gelu(tmp_path, batch):
    hf = hf_model(T5ForConditionalGeneration, "small", feed_forward_proj="gated-gelu")
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    assert model.config.activation == "gated-gelu"
    assert_parity(model, hf, batch)


def test_fp16_weights(tmp_path, batch):
    hf = hf_model(T5EncoderModel)
    hf.half().save_pretrained(tmp_path)
    assert load_file(str(tmp_path / "model.safetensors"))["shared.weight"].dtype == torch.float16
    model, _ = load_checkpoint(tmp_path)
    assert next(model.parameters()).dtype == torch.float32
    reference = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float32).eval()  # same rounded weights
    assert_parity(model, reference, batch)


def test_bfloat16_load_reads_straight_into_bfloat16(tmp_path, batch):
    """An fp32 HF file loaded in bf16: each tensor converted as it is read (never the whole fp32 model
    alive), the same weights as casting after a float32 load, in every shard."""
    from conftest import LiveFloat32

    hf = hf_model(T5ForConditionalGeneration)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    full, _ = load_hf(tmp_path)
    with LiveFloat32() as watch:
        half, _ = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    for name, p in half.named_parameters():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, full.get_parameter(name).to(torch.bfloat16), rtol=0, atol=0)
    assert watch.peak <= max(p.numel() * 4 for p in full.parameters()) * 2
    assert watch.peak < sum(p.numel() * 4 for p in full.parameters()) / 4


def test_sharded_safetensors_and_pytorch_bin(tmp_path, batch):
    hf = hf_model(T5ForConditionalGeneration)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_parity(load_hf(tmp_path / "sharded")[0], hf, batch)
    # an old-style pytorch_model.bin (the file name Rostlab's repos use), read with weights_only
    (tmp_path / "bin").mkdir()
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert_parity(load_hf(tmp_path / "bin")[0], hf, batch)


def test_rostlab_style_file_with_stored_lm_head_follows_config(tmp_path, caplog):
    """Rostlab's full model stores lm_head.weight but leaves tie_word_embeddings at its default (True):
    prott5nv follows the config (tied head, scaled output) and says it ignored the stored matrix."""
    hf = hf_model(T5ForConditionalGeneration)
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
    state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()  # aliases as older files have
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="prott5nv.checkpoint.hf"):
        model, _ = load_hf(tmp_path)
    assert model.config.tie_word_embeddings and model.config.extra["hf"]["ignored_lm_head_weight"]
    assert "stored lm_head.weight" in caplog.text


def test_rostlab_tokenizer_conventions(tmp_path, spm_model_bytes):
    hf = hf_model(T5EncoderModel, "small")
    hf.save_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes(
        spm_model_bytes([p if p.startswith("<") else "\u2581" + p for p in ROSTLAB_PIECES])
    )
    _, tok = load_hf(tmp_path)
    assert tok.layout == "rostlab" and set("UZOB") <= set(tok.rare_to_x)
    ids = tok.encode("MKUZOB")
    assert ids.tolist() == [19, 14, 23, 23, 23, 23, 1] and tok.num_special_suffix == 1
    assert tok.token_to_id("<extra_id_0>") == 127
    # a vocabulary that is not Rostlab's is refused
    (tmp_path / "spiece.model").write_bytes(spm_model_bytes(["<pad>", "</s>", "<unk>", "\u2581L", "\u2581A"]))
    with pytest.raises(CheckpointError, match="not the Rostlab ProtT5 vocabulary"):
        load_hf(tmp_path)


def test_vocabulary_size(tmp_path, batch):
    hf = hf_model(T5EncoderModel, "small", vocab_size=150)  # ProstT5: 128 + 3Di letters + 2 prefixes
    hf.save_pretrained(tmp_path / "prost")
    model, _ = load_hf(tmp_path / "prost")
    assert model.config.vocab_size == 150
    assert_parity(model, hf, batch)
    hf_model(T5EncoderModel, "small", vocab_size=100).save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match="vocab_size 100 is smaller than the rostlab tokenizer's 128"):
        load_hf(tmp_path / "small")


def test_refuses_unknown_settings_and_missing_weights(tmp_path):
    hf_model(T5EncoderModel, "small").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj 'gated-silu'"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing: \['encoder.block.2"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        load_hf(tmp_path)


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("cls", [T5EncoderModel, T5ForConditionalGeneration], ids=["encoder", "full"])
def test_export_round_trip_through_transformers(tmp_path, batch, cls):
    hf = hf_model(cls)
    hf.save_pretrained(tmp_path / "src")
    model, tok = load_hf(tmp_path / "src")
    save_hf(model, tok, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [cls.__name__] and cfg["model_type"] == "t5"
    assert (cfg["pad_token_id"], cfg["eos_token_id"], cfg["decoder_start_token_id"]) == (0, 1, 0)
    back = cls.from_pretrained(tmp_path / "out").eval()
    assert_parity(model, back, batch)
    assert_parity(load_hf(tmp_path / "out")[0], hf, batch)


@pytest.mark.parametrize("activation", ["relu", "gated-gelu", "gelu"])
@pytest.mark.parametrize("tied", [True, False])
def test_export_native_t5_model(tmp_path, batch, activation, tied):
    config = preset("tiny").replace(family="t5", activation=activation, tie_word_embeddings=tied,
                                    layer_norm_epsilon=1e-6, initializer_std=1.0, d_kv=32)  # fmt: skip
    torch.manual_seed(3)
    model = T5Model(config).eval()
    save_hf(model, ProteinTokenizer.for_layout("rostlab"), tmp_path)
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_parity(model, hf, batch)


def test_export_dtype_and_megatron_refused(tmp_path):
    torch.manual_seed(0)
    model = T5Model(preset("tiny").replace(family="t5", activation="relu", num_decoder_layers=0))
    save_hf(model, ProteinTokenizer.for_layout("rostlab"), tmp_path / "half", dtype=torch.float16)
    assert {v.dtype for v in load_file(str(tmp_path / "half" / "model.safetensors")).values()} == {torch.float16}
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(CheckpointError, match="cannot export a megatron-family model to HF T5"):
        save_hf(T5Model(preset("tiny")), ProteinTokenizer(), tmp_path / "meg")
    assert not (tmp_path / "meg").exists()


def test_convert_cli_hf_native_hf(tmp_path, batch, capsys):
    hf = hf_model(T5ForConditionalGeneration)
    hf.save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "prott5nv"
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert_parity(load_checkpoint(tmp_path / "native")[0], hf, batch)
    assert_parity(load_hf(tmp_path / "hf2")[0], T5ForConditionalGeneration.from_pretrained(tmp_path / "hf2"), batch)
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--dtype", "bfloat16"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--dtype", "bfloat16",
                     "--overwrite"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf2", "native"]  # no temp dirs left
