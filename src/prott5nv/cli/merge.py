"""`prott5nv merge OUT SHARD...`: join the outputs of `embed --shard K/N` (K = 1..N) into one output."""

from __future__ import annotations

import argparse

from ..inference.writers import FORMATS, check_output, format_from_path
from .common import add_overwrite_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="join the shard outputs of `embed --shard K/N` into one output",
        description="Check that the outputs of `prott5nv embed --shard K/N` are every shard 1..N once, each "
        "complete, made with the same settings (input content, model weights, precision, layers, outputs, "
        "length policy, batching) -- else refuse, naming the shard -- and write them as one output in input "
        "order: the file a one-process `embed` writes, bit for bit in its embeddings. The output has the "
        "shards' format (HDF5, .npy directory or Parquet).",
    )
    p.add_argument("output", help="merged output file or directory (written atomically)")
    p.add_argument("shards", nargs="+", metavar="SHARD", help="the output of each shard (any order)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the output name")
    add_overwrite_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.shards import merge_shards

    fmt = args.format or format_from_path(args.output)
    check_output(fmt, args.output, inputs=tuple(args.shards), overwrite=args.overwrite)
    print(merge_shards(args.shards, args.output, fmt=args.format).line())
    return 0
