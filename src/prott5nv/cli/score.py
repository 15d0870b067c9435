"""`prott5nv score` (masked-token loss and perplexity per protein) and `prott5nv score-variants`."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tqdm import tqdm

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError, InvalidSequenceError
from ..fasta import open_maybe_gzip, read_fasta
from ..fsutil import atomic_text_file, check_output
from ..sequence import location
from .common import add_model_args, add_overwrite_arg, add_sequence_policy_args, existing, load_model, sequence_policy
from .generate import summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="per-protein masked-token loss and perplexity (the T5 pretraining objective)",
        description="Mask each protein as in pretraining (15% of residues, single-residue spans, each replaced "
        "by the next sentinel; deterministic for a given --seed and sequence; proteins cut to their first "
        "510 residues) and teacher-force the decoder on the target. CSV columns: id, length, n_masked, loss "
        "(mean cross-entropy in nats over the masked residues only -- sentinels and EOS are not counted), "
        "perplexity (exp(loss)). The summary line gives the residue-weighted overall perplexity.",
    )
    p.add_argument("input", help="FASTA file (plain or .gz)")
    p.add_argument("-o", "--output", required=True, help="output CSV (written atomically)")
    add_overwrite_arg(p)
    p.add_argument("--seed", type=int, default=0, help="masking seed (default: 0)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="fraction of residues masked (default: 0.15)")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help=f"token budget per batch (default: {DEFAULT_BATCH_TOKENS})")  # fmt: skip
    p.add_argument("--pll", action="store_true", help="all-positions pseudo-likelihood instead: every residue "
                   "masked alone (one encoder pass per residue); n_masked = residues scored, perplexity = "
                   "pseudo-perplexity")  # fmt: skip
    add_model_args(p, decoding=True)
    add_sequence_policy_args(p)
    p.set_defaults(func=run)

    v = sub.add_parser(
        "score-variants",
        help="log-likelihood ratio of amino-acid variants (mutant vs wild type)",
        description="For each variant (A23G: wild type A at 1-based position 23 mutated to G; A23G:K45R for "
        "several sites) the mutated positions are masked with sentinels in the wild-type protein and the "
        "decoder scores the wild-type and mutant residues: score = log p(mutant) - log p(wild type) in "
        "nats (positive: the model prefers the mutant). Wild type and mutant see the same encoder input, "
        "so swapping them negates the score. Output CSV: variant, score, log_p_wt, log_p_mut.",
    )
    v.add_argument("input", nargs="?", help="FASTA file holding the one wild-type protein (or --sequence)")
    v.add_argument("--sequence", help="the wild-type protein")
    v.add_argument("variants", nargs="*", metavar="VARIANT", help="variants such as A23G or A23G:K45R")
    v.add_argument("--variants", dest="variants_file", help="file with one variant per line (or comma-separated)")
    v.add_argument("-o", "--output", required=True, help="output CSV (written atomically)")
    add_overwrite_arg(v)
    add_model_args(v, decoding=True)
    add_sequence_policy_args(v)
    v.set_defaults(func=run_variants)


def run(args: argparse.Namespace) -> int:
    from ..inference.score import score_fasta

    check_output(args.output, inputs=existing(args.input, args.model), overwrite=args.overwrite)
    model = load_model(args)
    bars: list[tqdm] = []  # made once the input is read: nothing is printed before an input error

    def on_start(n: int) -> None:
        bars.append(tqdm(total=n, unit="prot", desc="score", dynamic_ncols=True))

    try:
        result = score_fasta(
            model, args.input, args.output, seed=args.seed, masked_lm_prob=args.mask_prob,
            batch_tokens=args.batch_tokens, policy=sequence_policy(args), pseudo_likelihood=args.pll,
            on_start=on_start, on_batch=lambda n: bars[0].update(n),
        )  # fmt: skip
    finally:
        for bar in bars:
            bar.close()
    print(result.line())
    return 0


def _wild_type(args: argparse.Namespace) -> tuple[str, str]:
    """The wild type and how messages name it."""
    if args.sequence and args.input:
        raise ConfigError("give the wild type either as a FASTA file or with --sequence, not both")
    if args.sequence:
        return args.sequence, "wild type"
    if not args.input:
        raise ConfigError("no wild type: give a FASTA file or --sequence")
    records = list(read_fasta(args.input, sequence_policy(args)))
    if len(records) != 1:
        raise InvalidSequenceError(f"{args.input}: expected one wild-type protein, found {len(records)} records")
    return records[0].sequence, location(records[0].id, args.input, records[0].line)


def run_variants(args: argparse.Namespace) -> int:
    # with --sequence, a first positional that looks like a variant is a variant, not a FASTA file
    if args.sequence and args.input and not Path(args.input).exists():
        args.variants.insert(0, args.input)
        args.input = None
    inputs = existing(args.input, args.variants_file, args.model)
    check_output(args.output, inputs=inputs, overwrite=args.overwrite)
    variants = list(args.variants)
    if args.variants_file:
        with open_maybe_gzip(args.variants_file) as fh:  # as every input: gzip, a byte-order mark, one error
            text = fh.read().decode("utf-8", errors="replace")
        variants += [v.strip() for line in text.splitlines() for v in line.split(",") if v.strip()]
    if not variants:
        raise ConfigError("no variants: list them as arguments or give --variants FILE")
    from ..inference.score import score_variants

    wild_type, name = _wild_type(args)
    model = load_model(args)
    scores = score_variants(model, wild_type, variants, policy=sequence_policy(args), name=name)
    with atomic_text_file(args.output) as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "score", "log_p_wt", "log_p_mut"])
        for s in scores:
            w.writerow([s.variant, f"{s.score:.6f}", f"{s.log_p_wt:.6f}", f"{s.log_p_mut:.6f}"])
    best = max(scores, key=lambda s: s.score)
    summary(f"scored {len(scores)} variants (highest {best.variant}: {best.score:+.3f} nats)", args.output)
    return 0
