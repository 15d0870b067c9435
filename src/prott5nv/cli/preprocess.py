"""`prott5nv preprocess INPUT... -o DATA_DIR`: FASTA -> filtered, split, memory-mapped training stores."""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from ..data.preprocess import PreprocessConfig, preprocess
from ..data.store import MANIFEST
from ..fsutil import check_output
from .common import add_sequence_policy_args, existing, sequence_policy


def count_or_fraction(text: str) -> int | float:
    """``4350`` is a count, ``0.01`` a fraction of the kept sequences."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="filter, de-duplicate and split FASTA files into memory-mapped training stores",
        description="Reads FASTA (plain or gzip) in one streaming pass and writes DATA_DIR/{train,val,test} "
        "plus DATA_DIR/manifest.json. The directory appears only when the run has finished.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="FASTA files (plain or gzip)")
    p.add_argument("-o", "--output", required=True, metavar="DATA_DIR", help="directory to create")
    p.add_argument("--max-length", type=int, default=512,
                   help="drop sequences longer than this (default 512, as ProtT5nv; 0: keep all)")
    p.add_argument("--min-length", type=int, default=1, help="drop sequences shorter than this (default 1)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate sequences (first one kept)")
    p.add_argument("--val", type=count_or_fraction, default=0,
                   help="validation split: a count (4350) or a fraction (0.01) of the kept sequences")
    p.add_argument("--test", type=count_or_fraction, default=0, help="test split, as --val")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip and count invalid records (bad characters, empty, duplicate ids) instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DATA_DIR if it is a data directory (its store; other files there are kept)")
    add_sequence_policy_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, inputs=existing(*args.inputs), overwrite=args.overwrite, kind="dir", marker=MANIFEST)
    config = PreprocessConfig(
        max_length=args.max_length or None,
        min_length=args.min_length,
        dedup=args.dedup,
        val=args.val,
        test=args.test,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        policy=sequence_policy(args),
        overwrite=args.overwrite,
    )
    total = sum(os.path.getsize(p) for p in args.inputs if os.path.isfile(p))
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=None) as bar:
        manifest = preprocess(args.inputs, args.output, config, progress=bar.update)
    seconds = time.perf_counter() - start
    c, s = manifest["counts"], manifest["splits"]
    print(
        f"preprocess: {c['records']} records -> {c['kept']} kept (train {s['train']['sequences']}, "
        f"val {s['val']['sequences']}, test {s['test']['sequences']}); dropped {c['too_long']} too long, "
        f"{c['too_short']} too short, {c['duplicates']} duplicates, {c['invalid'] + c['duplicate_ids']} "
        f"invalid; {total / 1e6 / seconds:.0f} MB/s; wrote {args.output}"
    )
    return 0
