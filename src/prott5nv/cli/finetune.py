"""`prott5nv finetune TASK_FILE --model M -o RUN_DIR`: train a predictor on ProtT5nv features.

TASK_FILE is a CSV/TSV (gzip detected by content) with a `sequence` column, a target, optionally a
per-residue mask (`resolved`) and a `split` column (train/val/test; without one, a seeded
--val-fraction of the rows is held out), or a FASTA file with --labels TABLE (joined by `id`). FLIP CSVs
load as they are. By default the encoder is frozen: embeddings are computed once (cached on disk, keyed by
model and sequence) and a head is trained on them; --finetune trains the encoder too (--unfreeze-layers N:
only its top N blocks); --lora trains low-rank adapters on the frozen encoder's projections (peft; the
lora extra). The run directory receives the predictor (predictor.json, head.safetensors, model/ when
fine-tuned, adapters.safetensors with --lora), metrics.json and PNG plots.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tqdm import tqdm

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..downstream import HEADS
from ..downstream.features import FEATURES, default_cache_dir
from ..downstream.options import FitOptions
from ..downstream.tasks import KINDS
from ..fsutil import check_output
from .common import (
    add_length_args,
    add_model_args,
    add_overwrite_arg,
    add_sequence_policy_args,
    description,
    existing,
    length_options,
    sequence_policy,
    with_default,
)

# (FitOptions field, type, help): flags map 1:1 onto the fields; "(default: X)" comes from FitOptions
FIT_FLAGS: list[tuple[str, type, str]] = [
    ("hidden", int, "hidden size: MLP units (default 256) or CNN channels (default 32)"),
    ("dropout", float, "head dropout"),
    ("lr", float, "learning rate (default: 1e-3 frozen, 1e-4 with --finetune, 3e-4 with --lora; the head gets 10x "
     "when the encoder trains)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("batch_size", int, "proteins per batch"),
    ("max_epochs", int, "epochs at most"),
    ("patience", int, "stop after N epochs without a better val score"),
    ("seed", int, "seed for the split, subsampling, initialisation and shuffling"),
    ("unfreeze_layers", int, "with --finetune: train only the top N encoder blocks (default: all)"),
    ("warmup_steps", int, "with --finetune/--lora: warmup of the inverse-sqrt schedule (0 = constant lr)"),
    ("max_steps", int, "with --finetune/--lora: optimizer steps at most"),
    ("lora_rank", int, "with --lora: rank of each adapter"),
    ("lora_alpha", float, "with --lora: adapter scale alpha (the update is alpha/rank x B A)"),
    ("lora_targets", str, "with --lora: projections adapted in every encoder block, from q,k,v (one fused "
     "projection: all three or none; also 'qkv'), o, wi, wo (MLP)"),
]
FIT_DEFAULTS = FitOptions()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="train a downstream predictor (frozen features or fine-tuning)",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("task_file", help="CSV/TSV task table, or FASTA with --labels")
    p.add_argument("-o", "--out", required=True, help="run directory (written atomically)")
    add_overwrite_arg(p)
    add_model_args(p)
    t = p.add_argument_group("task")
    t.add_argument("--target", action="append", help="target column (repeat for several regression targets; "
                   "default: the only column besides id, sequence, split and mask)")  # fmt: skip
    t.add_argument("--kind", default="auto", choices=["auto", *KINDS], help="task kind (default: inferred)")
    t.add_argument("--labels", help="label table (with an id column) for a FASTA task file")
    t.add_argument("--sequence-column", help="default: sequence or seq")
    t.add_argument("--mask-column", help="per-residue 0/1 mask column (default: resolved or mask, if present)")
    t.add_argument("--split-column", help="train/val/test column (default: split or set, if present)")
    t.add_argument("--classes", help="comma-separated class order (default: sorted training classes)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="held out for validation when no row is "
                   "val (default: 0.1)")  # fmt: skip
    t.add_argument("--max-train", type=int, help="use a seeded random subset of N training proteins")
    t.add_argument("--max-eval", type=int, help="use seeded random subsets of N val and N test proteins")
    h = p.add_argument_group("training")
    h.add_argument("--features", default="embeddings", choices=FEATURES,
                   help="embeddings (frozen encoder, default); no model: composition (amino-acid frequencies, "
                   "per protein), dipeptide (composition + 400 dipeptide frequencies, per protein), onehot "
                   "(residue identity) or onehot-window (one-hot of residues i-W..i+W, per residue)")  # fmt: skip
    h.add_argument("--window", type=int, default=7, help="half-width W of --features onehot-window (default: 7)")
    h.add_argument("--layer", type=int, default=None,
                   help="encoder layer the head reads (fair-esm's numbering: 0 = the embedding output, k = block "
                   "k, -1 = the last, after the final norm: the default); recorded in the predictor")  # fmt: skip
    h.add_argument("--head", default="mlp", choices=HEADS, help="linear, mlp (default) or cnn (per residue)")
    h.add_argument("--class-weights", action="store_true", help="balanced class weights against imbalance")
    h.add_argument("--finetune", action="store_true", help="train the encoder together with the head")
    h.add_argument("--lora", action="store_true", help="train LoRA adapters on the frozen encoder with the head "
                   "(needs peft: pip install 'prott5nv[lora]'); the run keeps the adapters and the head")  # fmt: skip
    for name, typ, help_ in FIT_FLAGS:
        h.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=with_default(help_, getattr(FIT_DEFAULTS, name)))  # fmt: skip
    e = add_embedding_args(p)
    e.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    add_length_args(p)
    add_sequence_policy_args(p)
    p.set_defaults(func=run)


def add_embedding_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--batch-tokens and the embedding cache flags (finetune and predict); `cache_dir(args)` reads them."""
    e = p.add_argument_group("embedding")
    e.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help=f"token budget per batch (default: {DEFAULT_BATCH_TOKENS})")  # fmt: skip
    e.add_argument("--cache-dir", default=None, help=f"embedding cache (default: {default_cache_dir()})")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    return e


def length_kwargs(args: argparse.Namespace) -> dict:
    """The length flags as :func:`~prott5nv.downstream.run.finetune_task` / `predict_file` arguments."""
    length = length_options(args)
    return {"long_policy": length.pop("mode"), **length}


def cache_dir(args: argparse.Namespace) -> str | None:
    return None if args.no_cache else str(args.cache_dir or default_cache_dir())


def progress_bars() -> tuple[Callable[[str, int], Callable[[int], None]], list[tqdm]]:
    """A progress factory for the downstream runs (residues) and the bars it made (to close)."""
    bars: list[tqdm] = []

    def make(desc: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=desc, unit="res", unit_scale=True, dynamic_ncols=True)
        bars.append(bar)
        return bar.update

    return make, bars


def run(args: argparse.Namespace) -> int:
    import torch

    from ..downstream.run import finetune_task

    inputs = existing(args.task_file, args.labels, args.model)  # a run directory holds predictor.json
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, kind="dir", marker="predictor.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    fit = {name: getattr(args, name) for name, _, _ in FIT_FLAGS if getattr(args, name) is not None}
    options = FitOptions(head=args.head, class_weights=args.class_weights, finetune=args.finetune, lora=args.lora,
                         batch_tokens=args.batch_tokens, **fit)  # fmt: skip
    make, bars = progress_bars()
    try:
        summary = finetune_task(
            args.task_file, args.out, model=args.model, features=args.features, window=args.window, options=options,
            target=args.target, kind=args.kind, labels=args.labels, sequence_column=args.sequence_column,
            mask_column=args.mask_column, split_column=args.split_column,
            classes=args.classes.split(",") if args.classes else None, val_fraction=args.val_fraction,
            max_train=args.max_train, max_eval=args.max_eval, **length_kwargs(args),
            cache_dir=cache_dir(args), device=args.device, dtype=args.dtype,
            policy=sequence_policy(args), progress=make, layer=args.layer,
        )  # fmt: skip
    finally:
        for bar in bars:
            bar.close()
    for line in summary.lines():
        print(line)
    return 0
