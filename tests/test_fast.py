"""The speed-ups of model/fast.py: each computes what the plain network computes."""

from __future__ import annotations

import copy

import pytest
import torch

from prott5nv.model import fast
from prott5nv.model.config import preset
from prott5nv.model.fast import (
    DecodingCache,
    apply_cpu_inference,
    apply_decoding_layout,
    apply_fast_dropout,
    apply_grouped_cross_attention,
    apply_packing,
    apply_speedups,
    dropout,
)
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer


def config(family: str, **overrides):
    cfg = preset("tiny") if family == "megatron" else preset("tiny").replace(family="t5", activation="relu")
    return cfg.replace(**overrides)


@pytest.mark.parametrize("family", ["megatron", "t5"])
def test_speedups_keep_keys_order_and_outputs(family, real_proteins):
    """apply_speedups keeps the state dict (keys, order, values) and the outputs, in eval and in training
    without dropout; applying twice is applying once."""
    torch.manual_seed(0)
    plain = T5Model(config(family, dropout_rate=0.0, attention_dropout_rate=0.0))
    fast_model = apply_speedups(apply_speedups(copy.deepcopy(plain)))
    assert type(fast_model.encoder.blocks[0].self_attention).__mro__.count(fast._PackedSelfAttention) == 1
    assert list(fast_model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fast_model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    tok = ProteinTokenizer()
    ids = torch.from_numpy(tok.encode(real_proteins[0][1][:60]))[None]
    dec = ids[:, :20]
    for train in (False, True):
        plain.train(train)
        fast_model.train(train)
        torch.testing.assert_close(fast_model(ids, None, dec), plain(ids, None, dec), atol=1e-5, rtol=1e-5)
    assert copy.deepcopy(fast_model) is not None  # the swapped classes copy


def test_dropout_mask_rate_scale_and_seed():
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


@pytest.mark.parametrize("speedups", [False, True])
@pytest.mark.parametrize("family", ["megatron", "t5"])
def test_cache_reorder_and_shared_encoder_rows(family, real_proteins, speedups, monkeypatch):
    """Beam-search machinery of the cache: reordering rows mid-way and decoding 2 rows per encoder input
    (capacity smaller than the steps so the buffers grow) equal plain decoding -- with the plain cache and
    repeated encoder rows, and with grouped cross-attention (which reads the one encoder row's keys for
    both decoder rows, never a copy), the decoding layout and a DecodingCache."""
    torch.manual_seed(0)
    model = T5Model(config(family)).eval()
    rows = []  # (decoder rows, encoder rows) seen by cross-attention
    if speedups:
        apply_decoding_layout(apply_grouped_cross_attention(model))
        grouped = fast._GroupedEncDecAttention.attend

        def spy(self, q, k, v, mask, few):
            rows.append((q.shape[0], k.shape[0]))
            return grouped(self, q, k, v, mask, few)

        monkeypatch.setattr(fast._GroupedEncDecAttention, "attend", spy)
    tok = ProteinTokenizer()
    enc_ids = torch.from_numpy(tok.encode(real_proteins[0][1][:40]))[None]
    dec = torch.stack([torch.from_numpy(tok.encode(real_proteins[i][1][:12])) for i in (1, 2)])  # [2, 12]
    with torch.no_grad():
        hidden = model.encode(enc_ids)  # one encoder row for both decoder rows
        full = model(enc_ids.expand(2, -1), None, dec)
        rows.clear()  # from here on, one encoder row for two decoder rows
        cache = DecodingCache(len(model.decoder.blocks), capacity=3) if speedups else model.new_cache(capacity=3)
        steps = [model.lm_logits(model.decode(dec[:, t : t + 1], hidden, cache=cache)) for t in range(6)]
        cache.reorder(torch.tensor([1, 0]))  # swap the rows: continue with the other row's history
        swapped = dec[[1, 0]]
        steps += [model.lm_logits(model.decode(swapped[:, t : t + 1], hidden, cache=cache)) for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps[:6], 1), full[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps[6:], 1), full[[1, 0], 6:], atol=1e-5, rtol=1e-5)
    assert cache.length == 12 and cache[0].k.shape[2] >= 12
    assert rows == ([(2, 1)] * 12 * len(model.decoder.blocks) if speedups else [])


def test_decoding_layout_keeps_values_and_outputs(tiny_model, real_proteins):
    torch.manual_seed(0)
    model = T5Model(preset("tiny")).eval()
    ids = torch.from_numpy(tiny_model.tokenizer.encode(real_proteins[3][1][:50]))[None]
    dec = ids[:, :10]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids, None, dec)
        apply_decoding_layout(model)
        apply_decoding_layout(model)  # idempotent
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
    model = apply_cpu_inference(T5Model(preset("tiny").replace(family="t5", activation="relu")).eval())
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

    cfg = preset("tiny") if family == "megatron" else preset("tiny").replace(family="t5", activation="gated-gelu")
    torch.manual_seed(0)
    model = T5Model(cfg.replace(dropout_rate=0.0, attention_dropout_rate=0.0)).train()
    models = {False: model, True: apply_packing(copy.deepcopy(model))}
    tok = tiny_model.tokenizer
    masker = T5Masker(tok, seq_length=cfg.seq_length, seq_length_dec=cfg.seq_length, seed=0)
    batch = collate_t5([masker(tok.encode_residues(s, rid), i) for i, (rid, s) in enumerate(real_proteins)],
                       tok.pad_id)  # fmt: skip
    assert not batch["enc_mask"].all() and not batch["dec_mask"].all()  # there is padding to skip

    def run(pack: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = models[pack]
        model.zero_grad()
        calls = []
        monkeypatch.setattr(fast, "Packing", lambda m, cls=fast.Packing: calls.append(1) or cls(m))
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


def test_fast_dropout_draws_the_same_rate_and_leaves_eval_alone(real_proteins):
    """apply_fast_dropout: eval outputs unchanged; in training, the hidden and attention dropout masks drop
    about p of the elements (the same rate as nn.Dropout) and gradients flow."""
    torch.manual_seed(0)
    plain = T5Model(config("t5", dropout_rate=0.1, attention_dropout_rate=0.1)).eval()
    model = apply_fast_dropout(copy.deepcopy(plain))
    ids = torch.from_numpy(ProteinTokenizer().encode(real_proteins[1][1][:60]))[None]
    with torch.no_grad():
        assert torch.equal(model.encode(ids), plain.encode(ids))
    attention = model.encoder.blocks[0].self_attention.train()
    q, k = (torch.randn(2, 4, 64, 16) for _ in range(2))
    out = attention.attend(q, k, torch.eye(64).expand(2, 4, 64, 64), None, few=False)  # v = I: the probs
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.02
    model.train()
    model(ids, None, ids[:, :20]).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
