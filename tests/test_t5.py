"""The network: parameter counts, padding invariance, caches, precision."""

from __future__ import annotations

import pytest
import torch

from prott5nv.errors import ConfigError
from prott5nv.model.config import T5Config, preset
from prott5nv.model.t5 import T5Model, count_parameters, relative_position_bucket


def megatron_param_formula(d: int, ff: int, layers: int, dec_layers: int, vocab: int, positions: int) -> int:
    """Parameters of a NeMo Megatron T5 with biases everywhere, counted by hand."""
    attn = 4 * d * d + 4 * d  # fused qkv (3 d x d + 3 d) and output dense (d x d + d)
    mlp = 2 * d * ff + ff + d
    norm = 2 * d  # LayerNorm weight + bias
    enc_layer = attn + mlp + 2 * norm
    dec_layer = enc_layer + attn + norm  # + cross-attention (q, kv, dense) and its norm
    embeddings = vocab * d + positions * d
    final_norms = 2 * norm
    lm_head_bias = vocab
    return layers * enc_layer + dec_layers * dec_layer + embeddings + final_norms + lm_head_bias


def test_prott5nv_base_parameter_count():
    n = count_parameters(preset("prott5nv-base"))
    assert n == megatron_param_formula(768, 3072, 12, 12, 128, 512) == 198_970_496
    # the model card's "~192M": the stated shape gives 199.0M (documented in the README)
    assert 190e6 < n < 200e6


def test_prot_t5_xl_shape_count():
    # Rostlab XL: no biases, RMSNorm weights only, tied LM head, one relative-bias table per stack
    d, ff, inner, layers, vocab = 1024, 16384, 4096, 24, 128
    enc_layer = 4 * d * inner + 2 * d * ff + 2 * d
    dec_layer = enc_layer + 4 * d * inner + d
    expected = layers * (enc_layer + dec_layer) + vocab * d + 2 * d + 2 * 32 * 32
    assert count_parameters(preset("prot_t5_xl")) == expected


def test_count_matches_instantiated_model():
    model = T5Model(preset("tiny"))
    assert model.num_parameters() == count_parameters(preset("tiny"))
    assert model.describe()["parameters"] == model.num_parameters()


@pytest.mark.parametrize("family", ["megatron", "t5"])
def test_padding_invariance(family, real_proteins, tiny_model):
    """A protein's encoder states do not change when it is batched with longer ones."""
    cfg = preset("tiny") if family == "megatron" else preset("tiny").replace(family="t5", activation="relu")
    torch.manual_seed(0)
    model = T5Model(cfg).eval()
    ids = [torch.from_numpy(tiny_model.tokenizer.encode(s)) for _, s in real_proteins]
    longest = max(len(t) for t in ids)
    batch = torch.full((len(ids), longest), 3)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, t in enumerate(ids):
        batch[i, : len(t)] = t
        mask[i, : len(t)] = 1
    with torch.no_grad():
        together = model.encode(batch, mask)
        for i, t in enumerate(ids):
            alone = model.encode(t[None], None)[0]
            torch.testing.assert_close(together[i, : len(t)], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["megatron", "t5"])
def test_incremental_decoding_matches_full(family, real_proteins):
    cfg = preset("tiny") if family == "megatron" else preset("tiny").replace(family="t5", activation="gated-gelu")
    torch.manual_seed(0)
    model = T5Model(cfg).eval()
    from prott5nv.tokenizer import ProteinTokenizer

    tok = ProteinTokenizer()
    enc_ids = torch.from_numpy(tok.encode(real_proteins[0][1][:60]))[None]
    dec_ids = torch.from_numpy(tok.encode(real_proteins[1][1][:20]))[None]
    with torch.no_grad():
        full = model(enc_ids, None, dec_ids)
        hidden = model.encode(enc_ids)
        cache = model.new_cache()
        steps = [model.lm_logits(model.decode(dec_ids[:, t : t + 1], hidden, cache=cache)) for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal():
    torch.manual_seed(0)
    model = T5Model(preset("tiny")).eval()
    enc = torch.randint(5, 30, (1, 12))
    dec = torch.randint(5, 30, (1, 10))
    changed = dec.clone()
    changed[0, 7:] = 6
    with torch.no_grad():
        a, b = model(enc, None, dec), model(enc, None, changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_half_precision_close_to_fp32(dtype, real_proteins, tiny_model):
    ids = torch.from_numpy(tiny_model.tokenizer.encode(real_proteins[2][1]))[None]
    model = tiny_model.model
    with torch.no_grad():
        ref = model.encode(ids)
        with torch.autocast("cpu", dtype=dtype):
            half = model.encode(ids)
    cos = torch.nn.functional.cosine_similarity(ref.mean(1), half.float().mean(1))
    assert cos.item() > 0.999


def test_relative_position_buckets_known_values():
    # T5 bidirectional, 32 buckets, max distance 128: exact below 8, log-spaced to 128, 16 per direction
    rel = torch.tensor([-200, -128, -20, -8, -7, -1, 0, 1, 7, 8, 20, 128, 200])
    got = relative_position_bucket(rel, True, 32, 128).tolist()
    assert got == [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31]
    # unidirectional (decoder): only the past has buckets
    got = relative_position_bucket(torch.tensor([-40, -3, 0, 5]), False, 32, 128).tolist()
    assert got == [23, 3, 0, 0]


def test_megatron_input_longer_than_positions_is_refused():
    model = T5Model(preset("tiny").replace(max_position_embeddings=16, seq_length=16)).eval()
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        model.encode(torch.randint(5, 30, (1, 17)))


def test_config_validation_and_round_trip():
    cfg = preset("small")
    assert T5Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model family 'bert'"):
        T5Config(family="bert")
    with pytest.raises(ConfigError, match="unknown model config keys: hidden"):
        T5Config.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-600, 600)[None, :] - torch.arange(0, 5)[:, None]
    ours = relative_position_bucket(rel, bidirectional, 32, 128)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
    assert torch.equal(ours, theirs)


# ---- attention's paths: each must compute what SDPA computes ----
def test_attention_dropout_path_matches_sdpa_without_dropout(real_proteins):
    """The CPU attention-dropout path (matmul, softmax, matmul) is SDPA's attention when nothing is dropped."""
    from prott5nv.model.t5 import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., 20:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(attend(q, k, v, mask, 0.25, few=True), ref, atol=1e-5, rtol=1e-5)
    bias = torch.randn(1, 4, 30, 30)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    torch.testing.assert_close(attend(q, k, v, bias, 1.0, few=True), ref, atol=1e-5, rtol=1e-5)
