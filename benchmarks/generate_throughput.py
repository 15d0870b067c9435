"""Decoding throughput of prott5nv `generate` against transformers `generate` on the same weights.

A random-weight HF `T5ForConditionalGeneration` of ProtT5nv's size (d_model 768, 12 heads of 64, d_ff
3072, 12+12 layers, ReLU, vocabulary 128) is saved to a temporary directory and loaded into prott5nv's
`t5` family with `prott5nv.checkpoint.hf.load_hf` (ProtT5nv's own `megatron` family is a layout
transformers cannot run). Both decode the same real proteins (Swiss-Prot, tests/data) in one batch,
greedy and with 4 beams; in fp32 the greedy token ids must be identical. Decoded tokens = tokens of the
returned sequences up to and including EOS (the same count for both, as the outputs agree); the time
includes the encoder pass, which both run once. Runs alternate between the two (this machine is noisy) and
the fastest of `--repeats` counts. `--dtype bf16` casts both models' weights to bf16 (equal precision on
both sides; outputs may then differ by near-ties). `--threads 1 2` measures each thread count in turn.
Greedy decoding is speculative (fp32 on CPU: an int8 draft proposes `draft_tokens`, the model verifies);
each greedy line also reports the draft's acceptance (drafted tokens kept per verification pass, and the
tokens emitted per pass) and the speed-up over one token per pass (`speculative=False`, same model).

`--model NAME` measures trained weights instead (e.g. the bundled prott5nv-demo, whose megatron family
transformers cannot run): speculative greedy against one token per pass on the model's own tasks, the
inputs its pretraining built from real proteins -- `span` (T5 span corruption: the decoder emits the
sentinels and the hidden residues) and `denoise` (15% corrupted in place: the decoder rebuilds the whole
protein, up to --new-tokens). Random weights agree with their own int8 copy on nearly every token; a
trained model's acceptance decides the real gain. Speculation is forced on here whatever the model's size
(`generate` itself speculates only for decoders of at least `speculation_min_bytes`, 64 MiB; the line
above the results says which applies).

    python benchmarks/generate_throughput.py [--prompts 8] [--new-tokens 64] [--threads 1 2] [--repeats 2]
        [--dtype fp32|bf16]
    python benchmarks/generate_throughput.py --model prott5nv-demo [--tasks span denoise] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from prott5nv.api import ProtT5nv
from prott5nv.checkpoint.hf import load_hf
from prott5nv.fasta import read_fasta
from prott5nv.model.generate import GenerationConfig, GenerationOutput, generate
from prott5nv.model.speculative import decoder_bytes

SWISSPROT = Path(__file__).resolve().parents[1] / "tests" / "data" / "swissprot_3k.fasta.gz"


def build_hf(path: Path):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=128, d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=12, num_decoder_layers=12,
        feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(path)
    return hf


def best_times(fns, repeats: int):
    """Outputs of each function and its fastest time over `repeats` alternating runs."""
    outs, best = [None] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return outs, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-length", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=150)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest counts")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of both models")
    ap.add_argument("--model", default=None, help="trained weights (name or path): speculative vs one token per "
                    "pass on the model's own tasks, no transformers")  # fmt: skip
    ap.add_argument("--tasks", nargs="+", choices=["span", "denoise"], default=["span", "denoise"])
    ap.add_argument("--draft-tokens", type=int, default=GenerationConfig.draft_tokens)
    ap.add_argument("--min-acceptance", type=float, default=GenerationConfig.min_acceptance,
                    help="share of drafted tokens below which speculation gives up after 4 passes (0: never)")
    args = ap.parse_args()
    if args.model:
        trained(args)
        return

    records = (r for r in read_fasta(SWISSPROT) if args.min_length <= len(r.sequence) <= args.max_length)
    seqs = [next(records).sequence for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf(Path(tmp))
        model, tokenizer = load_hf(tmp)
    if args.dtype == "bf16":
        hf.to(torch.bfloat16), model.to(torch.bfloat16)
    ours = ProtT5nv(model, tokenizer)
    input_ids, mask = ours.collate(ours.encode(seqs))
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{len(seqs)} proteins of {min(map(len, seqs))}-{max(map(len, seqs))} residues, "
              f"{args.new_tokens} new tokens, {args.dtype}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}")  # fmt: skip
        measure(ours, hf, input_ids, mask, args)


def speculation(stats: GenerationOutput, plain_seconds: float, seconds: float, args: argparse.Namespace) -> str:
    """The draft's acceptance and the speed-up over one token per pass, as one line's tail."""
    draft_tokens = args.draft_tokens
    gave_up = (stats.passes >= GenerationConfig.speculation_trial
               and stats.accepted < args.min_acceptance * stats.proposed)  # fmt: skip
    return (f"{stats.passes} verification passes, draft kept {stats.accepted} of {stats.proposed} proposed "
            f"({stats.accepted / max(stats.proposed, 1):.0%}, {stats.accepted / stats.passes:.2f} per pass of "
            f"{draft_tokens}){', then gave up' if gave_up else ''}; speed-up {plain_seconds / seconds:.2f}x over "
            "one token per pass")  # fmt: skip


def measure(ours: ProtT5nv, hf, input_ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace) -> None:
    tokenizer = ours.tokenizer
    for beams in (1, 4):

        def run_ours(beams=beams):
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, num_beams=beams, draft_tokens=args.draft_tokens,
                                   min_acceptance=args.min_acceptance)  # fmt: skip
            with torch.inference_mode():
                return generate(ours.model, input_ids, mask, cfg, decoder_start_id=tokenizer.decoder_start_id,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)  # fmt: skip

        def run_hf(beams=beams):
            with torch.inference_mode():
                return hf.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=beams,
                                   max_new_tokens=args.new_tokens)  # fmt: skip

        def run_plain():
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, speculative=False, draft_tokens=args.draft_tokens)
            with torch.inference_mode():
                return generate(ours.model, input_ids, mask, cfg, decoder_start_id=tokenizer.decoder_start_id,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)  # fmt: skip

        fns = [run_ours, run_hf] + ([run_plain] if beams == 1 else [])
        for fn in fns:  # warm-up
            fn()
        outs, times = best_times(fns, args.repeats)
        (out, ref), (t_ours, t_hf) = outs[:2], times[:2]
        ref_ids = ref[:, 1:].clone()
        is_eos = ref_ids == tokenizer.eos_id
        hf_lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, ref_ids.shape[1])
        ref_ids[torch.arange(ref_ids.shape[1])[None] >= out.lengths[:, None]] = tokenizer.pad_id
        same = torch.equal(ref_ids, out.sequences)
        tokens, hf_tokens = int(out.lengths.sum()), int(hf_lengths.sum())
        rate, hf_rate = tokens / t_ours, hf_tokens / t_hf
        name = "greedy" if beams == 1 else f"beam {beams}"
        print(f"{name:>7}: prott5nv {rate:7.1f} tok/s ({t_ours:.2f} s) | transformers {hf_rate:7.1f} tok/s "
              f"({t_hf:.2f} s) | ratio {rate / hf_rate:.2f}x | {tokens} tokens (transformers {hf_tokens}), "
              f"identical outputs: {same}")  # fmt: skip
        if out.passes:
            print(f"         {speculation(out, times[2], t_ours, args)}; identical to one token per "
                  f"pass: {torch.equal(out.sequences, outs[2].sequences)}")  # fmt: skip


def trained(args: argparse.Namespace) -> None:
    """Speculative greedy vs one token per pass on trained weights, on the model's pretraining tasks."""
    from prott5nv.api import load
    from prott5nv.data.masking import DenoiseMasker, T5Masker

    model = load(args.model)
    tok = model.tokenizer
    size, bound = decoder_bytes(model.model), GenerationConfig.speculation_min_bytes
    print(f"{args.model}: decoder weights {size / 2**20:.0f} MiB; by default `generate` "
          f"{'speculates' if size >= bound else 'does not speculate'} (bound {bound / 2**20:.0f} MiB); "
          "measured here with speculation forced on", flush=True)  # fmt: skip
    records = (r for r in read_fasta(SWISSPROT) if args.min_length <= len(r.sequence) <= args.max_length)
    seqs = [next(records).sequence for _ in range(args.prompts)]
    ids = model.encode(seqs)
    maskers = {"span": T5Masker(tok, masked_lm_prob=0.15), "denoise": DenoiseMasker(tok)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for task in args.tasks:
            samples = [maskers[task](t, i) for i, t in enumerate(ids)]
            input_ids, mask = model.collate([s.text_enc for s in samples])

            def run(speculative: bool, input_ids=input_ids, mask=mask) -> GenerationOutput:
                cfg = GenerationConfig(max_new_tokens=args.new_tokens, speculative=speculative,
                                       draft_tokens=args.draft_tokens, min_acceptance=args.min_acceptance,
                                       speculation_min_bytes=0, vocab_limit=tok.real_vocab_size)  # fmt: skip
                with torch.inference_mode():
                    return generate(model.model, input_ids, mask, cfg, decoder_start_id=tok.decoder_start_id,
                                    eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip

            run(True), run(False)  # warm-up (and the draft is made once)
            (spec, plain), (t_spec, t_plain) = best_times([lambda: run(True), lambda: run(False)], args.repeats)
            tokens = int(spec.lengths.sum())
            right = sum(int((spec.sequences[i, :n].numpy() == s.labels[:n]).sum())
                        for i, s in enumerate(samples) for n in [min(len(s.labels), int(spec.lengths[i]))])  # fmt: skip
            print(f"{args.model} {task:>7}: {len(seqs)} proteins of {min(map(len, seqs))}-{max(map(len, seqs))} "
                  f"residues, {threads} threads | speculative {tokens / t_spec:6.1f} tok/s ({t_spec:.2f} s) | one "
                  f"per pass {int(plain.lengths.sum()) / t_plain:6.1f} tok/s ({t_plain:.2f} s) | {tokens} tokens, "
                  f"{right / tokens:.0%} equal to the target | identical: "
                  f"{torch.equal(spec.sequences, plain.sequences)}", flush=True)  # fmt: skip
            print(f"         {speculation(spec, t_plain, t_spec, args)}", flush=True)


if __name__ == "__main__":
    main()
