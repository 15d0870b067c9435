"""Decoding: cache vs no cache, agreement with transformers `generate`, sampling, infilling, refusals, CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from prott5nv.api import ProtT5nv
from prott5nv.checkpoint import save_pretrained
from prott5nv.cli import main
from prott5nv.errors import ConfigError, InvalidSequenceError, ProtT5nvError
from prott5nv.inference.infill import STANDARD_RESIDUES, parse_masked
from prott5nv.model.generate import GenerationConfig, generate
from prott5nv.tokenizer import ProteinTokenizer

N_NEW = 24


def run(model: ProtT5nv, seqs: list[str], **settings) -> object:
    tok = model.tokenizer
    input_ids, mask = model.collate(model.encode(seqs))
    with torch.no_grad():
        return generate(model.model, input_ids, mask, GenerationConfig(**settings),
                        decoder_start_id=tok.decoder_start_id, eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip


@pytest.fixture(scope="module")
def prompts(real_proteins) -> list[str]:
    """Five real proteins, cut to 20..80 residues: a batch of mixed lengths."""
    return [seq[: 20 + 15 * i] for i, (_, seq) in enumerate(real_proteins[:5])]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random-weight HF T5ForConditionalGeneration and the same weights loaded into our `t5` family.
    Weights are drawn 3x wider than HF's default (less repetitive outputs) and the EOS row is scaled up so
    that hypotheses end at different lengths (exercises EOS handling and beam bookkeeping)."""
    import transformers

    from prott5nv.checkpoint import hf as hf_interop

    torch.manual_seed(1)
    cfg = transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        initializer_factor=3.0,
    )  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.shared.weight[1] *= 2.0
    path = tmp_path_factory.mktemp("hf_t5")
    hf.save_pretrained(path)
    model, tokenizer = hf_interop.load_hf(path)
    return hf, ProtT5nv(model, tokenizer)


def hf_generate(hf, ours: ProtT5nv, seqs: list[str], **kw):
    input_ids, mask = ours.collate(ours.encode(seqs))
    out = hf.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW,
                      output_scores=True, return_dict_in_generate=True, **kw)  # fmt: skip
    return out


def same_tokens(hf_sequences: torch.Tensor, out, pad_id: int) -> bool:
    """transformers pads finished beams with EOS when pad id is 0; compare up to each row's length."""
    ref = hf_sequences[:, 1:].clone()
    ref[torch.arange(ref.shape[1])[None] >= out.lengths[:, None]] = pad_id
    return torch.equal(ref, out.sequences)


def test_greedy_identical_to_transformers(hf_pair, prompts):
    hf, ours = hf_pair
    ref = hf_generate(hf, ours, prompts, num_beams=1)
    out = run(ours, prompts, max_new_tokens=N_NEW)
    assert same_tokens(ref.sequences, out, ours.tokenizer.pad_id)
    assert len(set(out.lengths.tolist())) > 1  # some rows stop at EOS, others run to max_new_tokens
    assert max(len(set(row.tolist())) for row in out.sequences) > 3  # not a single repeated token


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=4),
        dict(num_beams=4, num_return_sequences=3, length_penalty=2.0),
        dict(num_beams=3, num_return_sequences=2, early_stopping=True),
        dict(num_beams=3, num_return_sequences=3, early_stopping="never", length_penalty=0.5),
    ],
)
def test_beam_identical_to_transformers(hf_pair, prompts, kw):
    hf, ours = hf_pair
    ref = hf_generate(hf, ours, prompts, **kw)
    out = run(ours, prompts, max_new_tokens=N_NEW, **kw)
    assert same_tokens(ref.sequences, out, ours.tokenizer.pad_id)
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=4, num_return_sequences=2)])
@pytest.mark.parametrize("which", ["megatron", "t5"])
def test_cache_equals_uncached(tiny_model, hf_pair, prompts, settings, which):
    model = tiny_model if which == "megatron" else hf_pair[1]
    cached = run(model, prompts, max_new_tokens=16, **settings)
    uncached = run(model, prompts, max_new_tokens=16, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("draft_tokens", [1, 3, 8])
@pytest.mark.parametrize("which", ["megatron", "t5"])
def test_speculative_greedy_equals_one_token_per_pass(tiny_model, hf_pair, prompts, which, draft_tokens):
    """Greedy on CPU fp32 is speculative (an int8 draft proposes, the model verifies; at any size here): the same
    tokens, lengths and log-probs as one token per pass, with rows ending at EOS at different steps and
    max_new_tokens not a multiple of draft_tokens. (Speculation never gives up here, however often the tiny
    models' drafts disagree: giving up is tested below.)"""
    from prott5nv.model.decoding import Stepper

    model = tiny_model if which == "megatron" else hf_pair[1]
    passes = []
    feed = Stepper.feed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Stepper, "feed", lambda self, t: passes.append(self.model) or feed(self, t))
        fast = run(model, prompts, max_new_tokens=N_NEW + 1, draft_tokens=draft_tokens, min_acceptance=0.0,
                   speculation_min_bytes=0)  # fmt: skip
    plain = run(model, prompts, max_new_tokens=N_NEW + 1, speculative=False)
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(fast.lengths, plain.lengths)
    torch.testing.assert_close(fast.token_logprobs, plain.token_logprobs, atol=1e-5, rtol=1e-5)
    verify = sum(p is model.model for p in passes)  # passes of the fp32 model itself
    assert 0 < verify < N_NEW + 1 and len(passes) > verify  # the draft proposed; the model verified
    if which == "t5":
        assert len(set(plain.lengths.tolist())) > 1  # EOS mid-way in some rows


def test_speculation_gives_up_on_a_disagreeing_draft(tiny_model, prompts):
    """A draft that keeps less than `min_acceptance` of its proposals after `speculation_trial` passes is
    dropped: the rest is one token per pass, and the output is still plain greedy decoding."""
    from prott5nv.model import speculative as spec

    model = copy.deepcopy(tiny_model.model)  # a private copy: its own draft
    ours = ProtT5nv(model, tiny_model.tokenizer)
    draft = spec.draft_model(model)
    with torch.no_grad():  # the draft's own copy of the word table (and tied head) zeroed: it proposes id 0
        draft.embeddings.word_embeddings.weight.zero_()
        draft.lm_head_bias.zero_()
    plain = run(ours, prompts, max_new_tokens=N_NEW, speculative=False)
    assert not bool((plain.sequences == 0).any())  # the model itself never chooses id 0 (padding is 3)
    gave_up = run(ours, prompts, max_new_tokens=N_NEW, draft_tokens=3, speculation_min_bytes=0)
    assert spec.draft_model(model) is draft  # the scrambled draft was the one used
    assert (gave_up.passes, gave_up.proposed) == (4, 12) and gave_up.accepted < 6
    stubborn = run(ours, prompts, max_new_tokens=N_NEW, draft_tokens=3, min_acceptance=0.0, speculation_min_bytes=0)
    assert stubborn.passes > 4
    for out in (gave_up, stubborn):
        assert torch.equal(out.sequences, plain.sequences) and torch.equal(out.lengths, plain.lengths)
        torch.testing.assert_close(out.token_logprobs, plain.token_logprobs, atol=1e-5, rtol=1e-5)


def test_speculation_only_where_the_decoder_is_large(tiny_model, prompts):
    """By default a model whose decoder weights are under `speculation_min_bytes` (64 MiB; the tiny model's
    are far under) decodes one token per pass: no draft pass at all; with the bound at its size it speculates."""
    from prott5nv.model.speculative import decoder_bytes

    size = decoder_bytes(tiny_model.model)
    params = sum(p.numel() for p in tiny_model.model.decoder.parameters())
    assert size == 4 * params < GenerationConfig.speculation_min_bytes
    default = run(tiny_model, prompts, max_new_tokens=N_NEW)
    at_size = run(tiny_model, prompts, max_new_tokens=N_NEW, speculation_min_bytes=size)
    above = run(tiny_model, prompts, max_new_tokens=N_NEW, speculation_min_bytes=size + 1)
    assert default.passes is None and above.passes is None and at_size.passes > 0  # None: not speculative
    assert torch.equal(default.sequences, at_size.sequences)
    with pytest.raises(ConfigError, match="speculation_min_bytes must be >= 0"):
        GenerationConfig(speculation_min_bytes=-1).validate()


@pytest.mark.parametrize("kind", ["int8", "bf16", "int8 kernels fail"])
def test_draft_model_is_kept_until_the_weights_change(tiny_model, prompts, monkeypatch, kind):
    """The draft is int8 (dynamic quantization) or, where PyTorch cannot quantize or its quantized
    kernels do not run, bf16; either way it has no encoder, is reused while the weights stay, and
    speculative greedy still equals plain greedy."""
    from prott5nv.model import speculative as gen

    if kind == "bf16":
        monkeypatch.setattr(torch.ao.quantization, "quantize_dynamic", lambda *a, **k: 1 / 0)
    if kind == "int8 kernels fail":

        def fail(*args):
            raise RuntimeError("no quantized engine")

        monkeypatch.setattr(torch.ao.nn.quantized.dynamic.Linear, "forward", fail)
        kind = "bf16"
    model = copy.deepcopy(tiny_model.model)  # a private copy: its own draft
    ours = ProtT5nv(model, tiny_model.tokenizer)
    draft = gen.draft_model(model)
    assert gen.draft_model(model) is draft and draft.encoder is None and model.encoder is not None
    linear = draft.decoder.blocks[0].mlp.wo
    assert ("quantized" in type(linear).__module__) == (kind == "int8")
    assert draft.embeddings.word_embeddings.weight.dtype == (torch.float32 if kind == "int8" else torch.bfloat16)
    fast = run(ours, prompts, max_new_tokens=N_NEW, speculation_min_bytes=0)
    assert fast.passes > 0
    assert torch.equal(fast.sequences, run(ours, prompts, max_new_tokens=N_NEW, speculative=False).sequences)
    with torch.no_grad():
        model.decoder.blocks[0].mlp.wo.weight.mul_(1.0)  # an in-place update: the draft is rebuilt
    assert gen.draft_model(model) is not draft


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_model, prompts):
    a = tiny_model.generate(prompts, seed=7, do_sample=True, num_return_sequences=2, max_new_tokens=12)
    b = tiny_model.generate(prompts, seed=7, do_sample=True, num_return_sequences=2, max_new_tokens=12)
    c = tiny_model.generate(prompts, seed=8, do_sample=True, num_return_sequences=2, max_new_tokens=12)
    assert len(a) == 2 * len(prompts)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = tiny_model.generate(prompts, max_new_tokens=12)
    top1 = tiny_model.generate(prompts, seed=3, do_sample=True, top_k=1, temperature=0.7, max_new_tokens=12)
    nucleus = tiny_model.generate(prompts, seed=3, do_sample=True, top_p=1e-6, max_new_tokens=12)
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy] == [g.token_ids for g in nucleus]
    # the limits: a top_p or temperature that float32 rounds to 0 (or overflows with) still samples greedily
    for extreme in (dict(top_p=5e-324), dict(temperature=5e-324), dict(temperature=1e-40, top_p=1e-50)):
        limit = tiny_model.generate(prompts, seed=3, do_sample=True, max_new_tokens=12, **extreme)
        assert [g.token_ids for g in limit] == [g.token_ids for g in greedy], extreme


def test_generate_targets_and_hiddens_to_seq(tiny_model, prompts):
    masked = [p[:10] + "<mask>" + p[11:15] + "<mask:2>" + p[17:] for p in prompts]
    gens = tiny_model.generate(masked, max_new_tokens=8)
    assert [g.input for g in gens] == masked
    assert all(len(g.token_ids) <= 8 for g in gens)
    hiddens, mask = tiny_model.seqs_to_hiddens(prompts)
    assert tiny_model.hiddens_to_seq(hiddens, mask, max_new_tokens=8) == [
        g.target for g in tiny_model.generate(prompts, max_new_tokens=8)
    ]


def test_infill_keeps_residues_and_fills_valid_ones(tiny_model, real_proteins):
    seq = real_proteins[0][1][:120]
    positions = [3, 4, 17, 50, 51, 52, 99]
    text = "".join("<mask>" if i in positions else c for i, c in enumerate(seq))
    (res,) = tiny_model.infill(text, num_samples=4, seed=11)
    assert res.positions == positions
    assert len(res.samples) == len(res.probabilities) == 4
    for sample, probs in zip(res.samples, res.probabilities, strict=True):
        assert len(sample) == len(seq)
        assert all(sample[i] == seq[i] for i in range(len(seq)) if i not in positions)
        assert all(sample[i] in STANDARD_RESIDUES for i in positions)
        assert probs.shape == (len(positions),) and ((probs > 0) & (probs <= 1)).all()
    again = tiny_model.infill(text, num_samples=4, seed=11)[0]
    assert again.samples == res.samples
    greedy = tiny_model.infill([text, "MKT<mask:3>LLV<mask>A"], residues="AG")
    assert len(greedy[1].samples[0]) == 11 and set(greedy[1].samples[0][3:6] + greedy[1].samples[0][9]) <= {"A", "G"}
    beam = tiny_model.infill(text, num_beams=3)[0]
    assert len(beam.samples[0]) == len(seq)


def test_parse_masked_syntax():
    tok = ProteinTokenizer()
    m = parse_masked("mk t<mask>LL<MASK:3>v*", tok)
    assert m.residues == "MKT?LL???V" and m.spans == [(3, 1), (6, 3)]
    assert m.encoder_ids.tolist() == [*tok.encode("MKT"), tok.sentinel(0), *tok.encode("LL"), tok.sentinel(1),
                                      *tok.encode("V")]  # fmt: skip
    for bad in ("MK<mask:0>T", "MK*<mask>", "MKJ<mask>", ""):
        with pytest.raises(InvalidSequenceError):
            parse_masked(bad, tok)


def test_collapsed_sentinels_refused(tiny_model):
    collapsed = ProtT5nv(tiny_model.model, ProteinTokenizer(sentinels="collapsed"))
    with pytest.raises(ProtT5nvError, match="cannot tell masked spans apart"):
        collapsed.infill("MKT<mask>LLV")
    with pytest.raises(ProtT5nvError, match="cannot tell masked spans apart"):
        collapsed.generate("MKT<mask>LLV")
    assert len(collapsed.generate("MKTLLV", max_new_tokens=3)) == 1  # unmasked input decodes anyway


def test_bad_settings(tiny_model):
    for settings in (dict(num_beams=2, do_sample=True), dict(top_p=0.0), dict(num_return_sequences=2),
                     dict(max_new_tokens=600), dict(temperature=0)):  # fmt: skip
        with pytest.raises(ConfigError):
            tiny_model.generate("MKTLLV", **settings)


def test_cli_generate_and_infill(tiny_model, tmp_path, capsys):
    path = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "tiny")
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR<mask>ISFVKSH\nFSRQ<mask:2>EERLGL\n>b\nmseq<mask>nl\n")
    out = tmp_path / "gen.tsv"
    assert main(["generate", str(fasta), "--model", str(path), "-o", str(out), "--num-beams", "2",
                 "--num-return-sequences", "2", "--max-new-tokens", "6"]) == 0  # fmt: skip
    rows = out.read_text().splitlines()
    assert rows[0] == "id\trank\tscore\ttarget\tfilled" and len(rows) == 5
    assert "generated 4 targets for 2 proteins" in capsys.readouterr().out
    greedy = {}
    for flag in ([], ["--no-speculative"]):  # greedy: speculative by default, the same targets either way
        greedy[bool(flag)] = tmp_path / f"greedy{len(flag)}.tsv"
        assert main(["generate", str(fasta), "--model", str(path), "-o", str(greedy[bool(flag)]),
                     "--max-new-tokens", "9", *flag]) == 0  # fmt: skip
    assert greedy[False].read_text() == greedy[True].read_text() and len(greedy[True].read_text().splitlines()) == 3
    fa, probs = tmp_path / "fill.fa", tmp_path / "p.tsv"
    assert main(["infill", str(fasta), "--model", str(path), "-o", str(fa), "-n", "2", "--seed", "1",
                 "--probabilities", str(probs)]) == 0  # fmt: skip
    lines = fa.read_text().splitlines()
    assert [x.split()[0] for x in lines if x.startswith(">")] == [">a", ">a", ">b", ">b"]
    assert len(lines[1]) == len("MKTAYIAKQRXISFVKSHFSRQXXEERLGL") and lines[1].startswith("MKTAYIAKQR")
    assert len(probs.read_text().splitlines()) == 1 + 2 * 3 + 2 * 1
    assert main(["infill", "--model", str(path), "-s", "MKT<mask:0>L"]) == 2
    assert "error" in capsys.readouterr().err
