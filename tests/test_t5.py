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


# ---- speed paths (issues 4 and 7): each must compute what the plain path computes ----
def test_dropout_mask_rate_scale_and_seed():
    from prott5nv.model.t5 import dropout

    x = torch.ones(1_000_000, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002  # 1e6 Bernoulli(0.1) draws: sd 3e-4
    assert torch.unique(y.detach()).tolist() == [0.0, pytest.approx(1 / 0.9)]
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * keep / 0.9)/dx = keep / 0.9
    torch.manual_seed(5)
    assert torch.equal(dropout(torch.ones(1_000_000), 0.1), y.detach())  # the default generator decides
    assert dropout(x, 0.0) is x


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


@pytest.mark.parametrize("family", ["megatron", "t5"])
def test_cache_reorder_and_shared_encoder_rows(family, real_proteins):
    """Beam-search machinery of the cache: reordering rows mid-way and decoding 2 rows per encoder input
    (grouped cross-attention, capacity smaller than the steps so the buffers grow) equal plain decoding."""
    cfg = preset("tiny") if family == "megatron" else preset("tiny").replace(family="t5", activation="relu")
    torch.manual_seed(0)
    model = T5Model(cfg).eval()
    from prott5nv.tokenizer import ProteinTokenizer

    tok = ProteinTokenizer()
    enc_ids = torch.from_numpy(tok.encode(real_proteins[0][1][:40]))[None]
    dec = torch.stack([torch.from_numpy(tok.encode(real_proteins[i][1][:12])) for i in (1, 2)])  # [2, 12]
    with torch.no_grad():
        hidden = model.encode(enc_ids)  # one encoder row for both decoder rows
        full = model(enc_ids.expand(2, -1), None, dec)
        cache = model.new_cache(capacity=3)
        steps = [model.lm_logits(model.decode(dec[:, t : t + 1], hidden, cache=cache)) for t in range(6)]
        cache.reorder(torch.tensor([1, 0]))  # swap the rows: continue with the other row's history
        swapped = dec[[1, 0]]
        steps += [model.lm_logits(model.decode(swapped[:, t : t + 1], hidden, cache=cache)) for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps[:6], 1), full[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps[6:], 1), full[[1, 0], 6:], atol=1e-5, rtol=1e-5)
    assert cache.length == 12 and cache[0].k.shape[2] >= 12


def test_optimize_for_decoding_keeps_values_and_outputs(tiny_model, real_proteins):
    torch.manual_seed(0)
    model = T5Model(preset("tiny")).eval()
    ids = torch.from_numpy(tiny_model.tokenizer.encode(real_proteins[3][1][:50]))[None]
    dec = ids[:, :10]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids, None, dec)
        model.optimize_for_decoding()
        model.optimize_for_decoding()  # idempotent
        out = model(ids, None, dec)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.decoder.blocks[0].mlp.wi.weight.stride() == (1, preset("tiny").d_ff)  # column-major
    assert model.encoder.blocks[0].mlp.wi.weight.is_contiguous()  # the encoder keeps its layout
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_inference_relu_by_sign_bit_equals_relu():
    """The inference-only bf16 ReLU (int16 view clamped at 0) gives exactly torch.relu's result, and
    a relative-position bias arrives contiguous (attention kernels would copy it in every layer)."""
    torch.manual_seed(0)
    model = T5Model(preset("tiny").replace(family="t5", activation="relu")).eval()
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    mlp = model.encoder.blocks[0].mlp.to(torch.bfloat16)
    with torch.no_grad():
        fast = mlp(x)
    expected = mlp.wo(torch.relu(mlp.wi(x)))  # grad enabled: the ordinary path
    assert torch.equal(fast, expected.detach())
    assert model.encoder.relative_bias(5, 9).is_contiguous()


@pytest.mark.parametrize("family", ["megatron", "t5"])
def test_training_forward_skips_padding_with_the_same_result(family, real_proteins, tiny_model, monkeypatch):
    """Training forwards run the token-wise layers on real tokens only (Packing): the logits at real
    positions and every parameter gradient of a masked loss equal those of the padded computation."""
    from prott5nv.data.masking import T5Masker, collate_t5
    from prott5nv.model import t5

    cfg = preset("tiny") if family == "megatron" else preset("tiny").replace(family="t5", activation="gated-gelu")
    torch.manual_seed(0)
    model = T5Model(cfg.replace(dropout_rate=0.0, attention_dropout_rate=0.0)).train()
    tok = tiny_model.tokenizer
    masker = T5Masker(tok, seq_length=cfg.seq_length, seq_length_dec=cfg.seq_length, seed=0)
    batch = collate_t5([masker(tok.encode_residues(s, rid), i) for i, (rid, s) in enumerate(real_proteins)],
                       tok.pad_id)  # fmt: skip
    assert not batch["enc_mask"].all() and not batch["dec_mask"].all()  # there is padding to skip

    def run(pack: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(t5.Stack, "pack_tokens", pack)
        model.zero_grad()
        calls = []
        monkeypatch.setattr(t5, "Packing", lambda m, cls=t5.Packing: calls.append(1) or cls(m))
        logits = model(batch["text_enc"], batch["enc_mask"], batch["text_dec"], batch["dec_mask"])
        assert bool(calls) == pack  # both stacks packed, or neither
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        (loss * batch["loss_mask"].flatten()).sum().backward()
        real = batch["dec_mask"].bool()
        return logits[real], [p.grad.clone() for p in model.parameters()]

    packed_logits, packed_grads = run(True)
    padded_logits, padded_grads = run(False)
    torch.testing.assert_close(packed_logits, padded_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
