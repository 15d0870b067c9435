"""`prott5nv embed INPUT -o OUT.h5`: per-protein (or per-residue) embeddings of a FASTA file."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..inference.embed import EmbedOptions, embed_fasta
from .common import add_model_args, add_sequence_policy_args, load_model, sequence_policy


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed proteins of a FASTA file into HDF5",
        description="Embed every protein of a FASTA file (plain or gzip) with the encoder. Output: HDF5, "
        "one dataset per protein named by its FASTA id (attribute original_id): the mean over residues "
        "(D,) by default, or (L, D) per residue with --per-residue.",
    )
    p.add_argument("input", help="FASTA file (plain or .gz)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (written atomically)")
    add_model_args(p)
    p.add_argument("--per-residue", action="store_true", help="store (L, D) per-residue embeddings")
    p.add_argument(
        "--batch-tokens", type=int, default=4096,
        help="token budget per batch, padding included (default: 4096)",
    )  # fmt: skip
    p.add_argument("--max-length", type=int, default=None, help="longest protein allowed (default: model limit)")
    p.add_argument(
        "--truncate", action="store_true",
        help="keep the first --max-length residues of longer proteins (default: refuse them)",
    )  # fmt: skip
    add_sequence_policy_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    options = EmbedOptions(
        per_residue=args.per_residue,
        batch_tokens=args.batch_tokens,
        max_length=args.max_length,
        truncate=args.truncate,
        policy=sequence_policy(args),
    )
    bar: tqdm | None = None

    def on_start(records: int, residues: int) -> None:
        nonlocal bar
        bar = tqdm(total=residues, unit="res", unit_scale=True, desc="embed", dynamic_ncols=True)

    def on_batch(proteins: int, residues: int) -> None:
        if bar is not None:
            bar.update(residues)

    try:
        summary = embed_fasta(model, args.input, args.output, options, on_batch=on_batch, on_start=on_start)
    finally:
        if bar is not None:
            bar.close()
    print(summary.line())
    return 0
