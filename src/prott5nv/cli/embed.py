"""`prott5nv embed INPUT -o OUT`: per-protein and/or per-residue embeddings of a FASTA file.

Under `torchrun` (environment RANK / WORLD_SIZE / LOCAL_RANK) every process embeds its share of the
records (record i -> rank i % WORLD_SIZE, on cuda:LOCAL_RANK when the device is CUDA) and rank 0 writes
the merged output. `--shard K/N` embeds one of N shards of the input into its own output, with no
coordination (a SLURM array, a Nextflow process); `prott5nv merge` joins them. Flags are added in groups
(`_add_*_args`) so other front ends can reuse them.
"""

from __future__ import annotations

import argparse
import os
import re

from tqdm import tqdm

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..inference.writers import FORMATS, POOLINGS, check_output, format_from_path
from .common import (
    add_length_args,
    add_model_args,
    add_overwrite_arg,
    add_sequence_policy_args,
    existing,
    length_options,
    load_model,
    sequence_policy,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed proteins of a FASTA file (HDF5, .npy directory or Parquet)",
        description="Embed every protein of a FASTA file (plain or gzip) with the encoder. Output by name: "
        "OUT.h5 (bio_embeddings layout: one dataset per protein named by its FASTA id, attribute "
        "original_id), OUT.parquet (one row per protein) or OUT without a suffix, a directory of .npy files. "
        "Default: the mean over residues (D,); --pooling and --per-residue choose other outputs. An interrupted run "
        "(Ctrl-C, kill) resumes when the same command is run again. Several processes: "
        "`torchrun --nproc-per-node N -m prott5nv embed ...`; several machines: --shard K/N, then "
        "`prott5nv merge`.",
    )
    p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$")  # `--layers -1,6` is a value, not a flag
    p.add_argument("input", help="FASTA file (plain or .gz)")
    p.add_argument("-o", "--output", required=True, help="output file or directory (written atomically)")
    add_model_args(p, quantize=True)
    _add_server_args(p)
    _add_output_args(p)
    _add_batching_args(p)
    add_length_args(p)
    add_sequence_policy_args(p)
    p.set_defaults(func=run)


def _add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote model")
    g.add_argument(
        "--server", metavar="URL", default=None,
        help="send the batches to a `prott5nv serve` at URL instead of loading --model here (the server's "
        "model, precision and limits apply); the output is the file a local run writes",
    )  # fmt: skip
    g.add_argument("--api-key-file", default=None, help="with --server: file holding the API key (its first key)")


def encoder(args: argparse.Namespace):  # noqa: ANN201 - ProtT5nv or RemoteEncoder
    """The model the pipeline calls: loaded here, or a server's (`--server`)."""
    if not args.server:
        return load_model(args)
    from ..client import Client, RemoteEncoder
    from ..serve.limits import read_api_keys

    key = read_api_keys(args.api_key_file)[0] if args.api_key_file else None
    return RemoteEncoder(Client(args.server, api_key=key))


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--pooling", default=None,
        help=f"comma-separated per-protein poolings from {','.join(POOLINGS)} (default: mean, or none with "
        "--per-residue); 'first' is the first residue's state (ProtT5nv has no BOS/CLS token)",
    )  # fmt: skip
    g.add_argument("--per-residue", action="store_true", help="store (L, D) per-residue embeddings")
    g.add_argument(
        "--layers", type=layer_list, default=None, metavar="K[,K...]",
        help="encoder layers to output (fair-esm's --repr_layers numbering): 0 = the embedding output, k = "
        "block k's output, -1 = the last, after the final norm (default: -1 alone); negative numbers count "
        "from the end. Several layers: outputs named layer{k}_{kind}, k from 0",
    )  # fmt: skip
    g.add_argument(
        "--shard", type=shard_arg, default=None, metavar="K/N",
        help="embed only shard K of N (1 <= K <= N; records in whole --window blocks dealt round-robin) into "
        "OUT, to be joined by `prott5nv merge` into the file one process writes",
    )  # fmt: skip
    g.add_argument("--format", choices=FORMATS, default=None, help="default: from the output name")
    g.add_argument("--restart", action="store_true", help="discard an interrupted run instead of resuming it")
    add_overwrite_arg(g)


def layer_list(text: str) -> tuple[int, ...]:
    """argparse type of --layers: comma-separated integers (checked against the model once it is loaded)."""
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as -1,6, got {text!r}") from None


def shard_arg(text: str) -> tuple[int, int]:
    from ..inference.shards import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--shard {text!r}: ")) from None


def _add_batching_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching and threads")
    g.add_argument(
        "--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
        help=f"token budget per batch, padding included (default: {DEFAULT_BATCH_TOKENS})",
    )  # fmt: skip
    g.add_argument("--window", type=int, default=4096, help="records sorted by length together (default: 4096)")
    g.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads per process (default: PyTorch's choice, divided among local torchrun processes)",
    )  # fmt: skip


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..inference.embed import EmbedOptions, embed_fasta

    fmt = args.format or format_from_path(args.output)
    check_output(fmt, args.output, inputs=tuple(existing(args.input, args.model)), overwrite=args.overwrite)
    rank, world, local_rank = distributed_env()
    if world > 1 and args.device in ("cuda", "auto") and torch.cuda.is_available():
        args.device = f"cuda:{local_rank}"
    threads = args.threads
    if threads is None and world > 1:
        threads = max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if threads:
        torch.set_num_threads(threads)
    model = encoder(args)
    length = length_options(args)
    options = EmbedOptions(
        per_residue=args.per_residue,
        poolings=tuple(p.strip() for p in args.pooling.split(",") if p.strip()) if args.pooling else None,
        batch_tokens=args.batch_tokens,
        max_length=length["max_length"],
        long_policy=length["mode"],
        chunk_size=length["chunk_size"],
        chunk_overlap=length["chunk_overlap"],
        policy=sequence_policy(args),
        window=args.window,
        format=args.format,
        restart=args.restart,
        layers=args.layers,
        shard=args.shard,
        rank=rank,
        world_size=world,
    )
    bar: tqdm | None = None

    def on_start(proteins: int, residues: int) -> None:
        nonlocal bar
        desc = "embed" if world == 1 else f"embed rank {rank}"
        if args.shard:
            desc += " shard {}/{}".format(*args.shard)
        bar = tqdm(total=residues, unit="res", unit_scale=True, desc=desc, dynamic_ncols=True, position=rank)

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
