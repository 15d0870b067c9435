"""`prott5nv predict RUN_DIR INPUT -o OUT`: predictions of a saved predictor for a FASTA or CSV/TSV file.

OUT (CSV, or TSV when it ends in .tsv) has `id`, `sequence`, the target column (a class, a per-residue
label string or numbers) and, per protein classes, `probability`. When INPUT carries the target column
(a labelled test file), the predictions are also scored and the metrics printed.
"""

from __future__ import annotations

import argparse

from ..fsutil import check_output
from .common import add_length_args, add_overwrite_arg, add_sequence_policy_args, description, existing, sequence_policy
from .finetune import add_embedding_args, cache_dir, length_kwargs, progress_bars


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict with a predictor trained by `prott5nv finetune`",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", help="run directory written by `prott5nv finetune`")
    p.add_argument("input", help="FASTA or CSV/TSV with a sequence column")
    p.add_argument("-o", "--output", required=True, help="output table (written atomically)")
    add_overwrite_arg(p)
    p.add_argument("--model", help="base model (default: the one recorded in the run; must have the same weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    add_embedding_args(p)
    add_length_args(p, recorded=True)
    add_sequence_policy_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import load
    from ..downstream.run import predict_file

    check_output(args.output, inputs=existing(args.run_dir, args.input, args.model), overwrite=args.overwrite)
    make, bars = progress_bars()
    try:
        summary = predict_file(
            args.run_dir, args.input, args.output, model=load(args.model, device=args.device) if args.model else None,
            device=args.device, cache_dir=cache_dir(args),
            batch_tokens=args.batch_tokens, policy=sequence_policy(args), progress=make, **length_kwargs(args),
        )  # fmt: skip
    finally:
        for bar in bars:
            bar.close()
    print(summary.line())
    return 0
