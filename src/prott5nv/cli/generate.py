"""`prott5nv generate`: decode the T5 target of (masked) proteins -- greedy, beam search or sampling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import IO, TYPE_CHECKING

from tqdm import tqdm

from ..errors import ConfigError, SequenceTooLongError
from ..fasta import FastaReader
from ..fsutil import atomic_text_file, check_output
from ..sequence import location
from ..tokenizer import require_distinct_sentinels
from .common import add_model_args, add_overwrite_arg, add_sequence_policy_args, existing, load_model, sequence_policy

if TYPE_CHECKING:
    from ..api import ProtT5nv

MASK_HELP = (
    "Masks: '<mask>' hides one residue (its own sentinel, as in ProtT5nv pretraining); '<mask:K>' hides a "
    "span of K residues behind one sentinel (T5 span corruption; ProtT5nv itself only saw single-residue "
    "spans). Masked proteins come from a FASTA file (plain or gzip, '<mask>' written in the sequence lines) "
    "or from --sequence."
)


def add_input_args(p: argparse.ArgumentParser) -> None:
    """INPUT FASTA or --sequence, and the options every decoding command shares."""
    p.add_argument("input", nargs="?", help="FASTA file of (masked) proteins; or use --sequence")
    p.add_argument("-s", "--sequence", action="append", default=[], help="a (masked) protein; repeatable")
    p.add_argument("-o", "--output", help="output file (written atomically; default or '-': standard output)")
    add_overwrite_arg(p)
    p.add_argument("--batch-size", type=int, default=8, help="proteins decoded together (default: 8)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: unseeded)")
    add_model_args(p, decoding=True)
    add_sequence_policy_args(p)


def check_outputs(args: argparse.Namespace, *outputs: str | None) -> None:
    """Refuse outputs that exist (without --overwrite), are an input, or cannot be written: before any work."""
    inputs = existing(args.input, args.model)
    for out in outputs:
        if out and out != "-":
            check_output(out, inputs=inputs, overwrite=args.overwrite)


def read_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(id, masked text)`` pairs from --sequence and/or the FASTA input, every one's mask syntax and
    residues checked (:func:`check_inputs`, once the tokenizer is known). The FASTA reader keeps the
    text as written (``raw``: '<mask>' survives) and checks the file as for every command."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    records = [(f"seq{i + 1}", s, None) for i, s in enumerate(args.sequence)]
    if args.input:
        records += [(r.id, r.sequence, r.line) for r in FastaReader(args.input, sequence_policy(args), raw=True)]
    if not records:
        raise ConfigError("no input: give a FASTA file or --sequence")
    args.where = {rid: line for rid, _, line in records}  # header lines, for check_inputs' messages
    return [(rid, text) for rid, text, _ in records]


def check_inputs(args: argparse.Namespace, model: ProtT5nv, records: list[tuple[str, str]]) -> None:
    """Parse every masked protein before any decoding: a bad or too long one stops the run at once, its
    message naming the file, the header line, the record and the position (masked residues counted)."""
    from ..inference.infill import parse_masked

    limit = model.config.max_length
    for rid, text in records:
        line = args.where.get(rid)
        source = args.input if line else None
        masked = parse_masked(text, model.tokenizer, rid, sequence_policy(args), source=source, line=line)
        if limit is not None and len(masked.encoder_ids) > limit:
            raise SequenceTooLongError(
                f"{location(rid, source, line)}: {len(masked.encoder_ids)} encoder tokens, more than the model's "
                f"{limit} positions"
            )


@contextmanager
def output_stream(path: str | None) -> Iterator[IO[str]]:
    """The atomic output file, or standard output (no path, or '-')."""
    with atomic_text_file(path) if path and path != "-" else nullcontext(sys.stdout) as fh:
        yield fh


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="decode the T5 target (sentinel + residues ...) of masked proteins",
        description="The encoder reads each protein, usually with masked positions; the decoder emits the "
        "T5 target: each sentinel <extra_id_N> followed by the residues it hides, then </s> -- e.g. "
        "'MKT<mask>LLV<mask>A' -> '<extra_id_0>Y<extra_id_1>Q'. Greedy by default; --num-beams for beam "
        "search, --sample for temperature/top-k/top-p sampling. Output: TSV with columns id, rank, score, "
        "target, filled (the input with every span replaced by its decoded residues, any length; empty when "
        "the target does not name each sentinel in order). Use `prott5nv infill` for fills of exactly the "
        "masked length. " + MASK_HELP,
    )
    add_input_args(p)
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, help="decoder steps, EOS included (default: 64)")
    g.add_argument("--num-beams", type=int, default=1, help="beam width (default: 1 = greedy)")
    g.add_argument("--num-return-sequences", type=int, default=1, help="targets per input (beams or samples)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length**this")
    g.add_argument("--early-stopping", choices=["true", "false", "never"], default="false",
                   help="beam search stopping rule, as in transformers (default: false)")  # fmt: skip
    g.add_argument("--sample", action="store_true", help="sample instead of taking the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--no-speculative", dest="speculative", action="store_false",
                   help="greedy one token per pass (default on CPU fp32 for decoders of >= 64 MiB: an int8 "
                        "draft proposes 6 tokens, the model checks them in one pass; same tokens, faster)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_outputs(args, args.output)
    records = read_inputs(args)
    model = load_model(args)
    if any("<mask" in text for _, text in records):  # refused before any progress is shown
        require_distinct_sentinels(model.tokenizer, "generation from masked input")
    check_inputs(args, model, records)
    settings = dict(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping),
        num_return_sequences=args.num_return_sequences, speculative=args.speculative,
    )  # fmt: skip
    policy = sequence_policy(args)
    rows = ["id\trank\tscore\ttarget\tfilled\n"]  # written once all succeeded: no header before an error
    with tqdm(total=len(records), unit="prot", desc="generate") as bar:
        for lo in range(0, len(records), args.batch_size):
            chunk = records[lo : lo + args.batch_size]
            seed = None if args.seed is None else args.seed + lo
            results = model.generate([t for _, t in chunk], [i for i, _ in chunk], policy, seed=seed, **settings)
            per = len(results) // len(chunk)
            for k, g in enumerate(results):
                rid = chunk[k // per][0]
                rows.append(f"{rid}\t{k % per + 1}\t{g.score:.4f}\t{g.target}\t{g.filled or ''}\n")
            bar.update(len(chunk))
    with output_stream(args.output) as out:
        out.writelines(rows)
    summary(f"generated {len(rows) - 1} targets for {len(records)} proteins", args.output)
    return 0


def summary(text: str, output: str | None) -> None:
    """The one summary line: on standard output, or on standard error when the results went there."""
    to_file = output and output != "-"
    print(f"{text} -> {output if to_file else 'stdout'}", file=sys.stdout if to_file else sys.stderr)
