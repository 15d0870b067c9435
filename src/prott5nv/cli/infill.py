"""`prott5nv infill`: complete masked proteins with valid residues (constrained sentinel decoding)."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..errors import ConfigError
from ..sequence import STANDARD_RESIDUES
from ..tokenizer import require_distinct_sentinels
from .common import load_model, sequence_policy
from .generate import MASK_HELP, add_input_args, check_inputs, check_outputs, output_stream, read_inputs, summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infill",
        help="fill <mask> positions of proteins with residues (complete sequences)",
        description="Each masked position or span is replaced by the next sentinel in the encoder input; the "
        "decoder is constrained to emit sentinel 0, exactly as many residues as span 0 hides, sentinel 1, "
        "... so every output is the complete protein, of the input's length, with all unmasked residues "
        "kept. Greedy (the most likely fill) by default; with --num-samples > 1, samples (seeded by "
        "--seed). Output: FASTA, one record per sample, header '>ID sample=K mean_prob=P'; --probabilities "
        "writes a TSV of id, sample, position (1-based), residue, probability (renormalised over the "
        "allowed residues). " + MASK_HELP,
    )
    add_input_args(p)
    g = p.add_argument_group("infilling")
    g.add_argument("-n", "--num-samples", type=int, default=1, help="completions per protein (default: 1)")
    g.add_argument("--greedy", action="store_true", help="most likely fill even with --num-samples > 1")
    g.add_argument("--num-beams", type=int, default=1, help="beam search for the most likely fill")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely residues (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--residues", default=STANDARD_RESIDUES,
                   help=f"residues the fill may use (default: the 20 standard, {STANDARD_RESIDUES})")  # fmt: skip
    g.add_argument("--probabilities", help="also write per-position probabilities to this TSV (atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.probabilities and args.output and args.probabilities == args.output:
        raise ConfigError(f"--probabilities and -o name the same file '{args.output}'")
    check_outputs(args, args.output, args.probabilities)
    records = read_inputs(args)
    model = load_model(args)
    require_distinct_sentinels(model.tokenizer, "infilling")  # before any progress is shown
    check_inputs(args, model, records)
    policy = sequence_policy(args)
    results = []
    with tqdm(total=len(records), unit="prot", desc="infill") as bar:
        for lo in range(0, len(records), args.batch_size):
            chunk = records[lo : lo + args.batch_size]
            seed = None if args.seed is None else args.seed + lo
            results += model.infill(
                [t for _, t in chunk], [i for i, _ in chunk], policy, num_samples=args.num_samples, seed=seed,
                do_sample=False if args.greedy else None, num_beams=args.num_beams, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, residues=args.residues.upper(),
            )  # fmt: skip
            bar.update(len(chunk))
    with output_stream(args.output) as out:
        for (rid, _), res in zip(records, results, strict=True):
            for k, (seq, probs) in enumerate(zip(res.samples, res.probabilities, strict=True), 1):
                mean = float(probs.mean()) if len(probs) else 1.0
                out.write(f">{rid} sample={k} mean_prob={mean:.4f}\n")
                out.writelines(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60))
    if args.probabilities:
        with output_stream(args.probabilities) as out:
            out.write("id\tsample\tposition\tresidue\tprobability\n")
            for (rid, _), res in zip(records, results, strict=True):
                for k, (seq, probs) in enumerate(zip(res.samples, res.probabilities, strict=True), 1):
                    for pos, p in zip(res.positions, probs, strict=True):
                        out.write(f"{rid}\t{k}\t{pos + 1}\t{seq[pos]}\t{p:.6f}\n")
    n = sum(len(r.samples) for r in results)
    masked = sum(len(r.positions) for r in results)
    summary(f"infilled {masked} masked positions in {len(records)} proteins ({n} sequences)", args.output)
    return 0
