"""Arguments and helpers shared by several commands (one definition, so flags mean the same everywhere)."""

from __future__ import annotations

import argparse
import os
import re
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..inference.length import DEFAULT_CHUNK_OVERLAP
from ..precision import ALIASES, PRECISIONS, canonical_precision
from ..sequence import SequencePolicy

if TYPE_CHECKING:  # the model stack (torch) is imported by the commands that run a model, when they run
    from ..api import ProtT5nv

#: The names of :data:`prott5nv.device.DTYPES`, without importing torch to build the command line.
DTYPE_NAMES = PRECISIONS


def precision_arg(value: str) -> str:
    """argparse type of every precision flag: the canonical name, aliases (fp32, bf16, fp16) accepted."""
    try:
        return canonical_precision(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def precision_or_auto(value: str) -> str:
    """:func:`precision_arg`, or "auto" (bfloat16 where the device supports it)."""
    return value if value == "auto" else precision_arg(value)


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def description(doc: str | None) -> str | None:
    """A command module's docstring, past its first paragraph, as `--help` shows it: Sphinx roles as plain
    names (``:class:`~a.b.C` `` -> C) and double-backquoted literals single-quoted."""
    if not doc or "\n\n" not in doc:
        return None
    text = doc.split("\n\n", 1)[1]
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "`")


def default_text(value: object) -> str:
    """How a dataclass default reads in a flag's help ("(default: X)")."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def with_default(help_: str, default: object) -> str:
    """`help_` ending in the default it states, unless it describes its default itself or has none."""
    if "default" in help_ or default is None or default == "":
        return help_
    return f"{help_} (default: {default_text(default)})"


def add_model_args(
    p: argparse.ArgumentParser, *, default_model: str = "prott5nv-demo", decoding: bool = False,
    quantize: bool = False,
) -> None:  # fmt: skip
    """--model, --device, --dtype; --sentinels for the commands that run the decoder (`decoding`);
    --quantize for those that only run the encoder (`quantize`)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=default_model,
        help="bundled model name, native checkpoint directory, .nemo archive or HF T5 directory "
        f"(default: {default_model})",
    )  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g.add_argument(
        "--dtype", default="float32", type=precision_or_auto, metavar="{" + ",".join([*PRECISIONS, "auto"]) + "}",
        help="compute precision (bfloat16 is the CPU half precision; float16 needs CUDA; auto: bfloat16 "
        "where supported -- CUDA, CPUs with AVX512-BF16/AMX -- else float32; the aliases "
        f"{', '.join(ALIASES)} are accepted)",
    )  # fmt: skip
    if quantize:
        g.add_argument(
            "--quantize", choices=["int8"], default=None,
            help="int8: the encoder's linear layers as int8 matrix products (weights per channel, activations per "
            "token; compiled once per run). CPU only, with AVX512-VNNI or AMX and a C++ compiler. Pair it with "
            "--dtype bfloat16 (the other layers' precision)",
        )  # fmt: skip
    if decoding:
        g.add_argument(
            "--sentinels", choices=["distinct", "collapsed"], default=None,
            help=".nemo archives only: read the sentinel tokens <extra_id_N> as distinct ids 32.. (NeMo <= 1.12) "
            "or all as <unk> (NeMo >= 1.13) instead of deciding from the archive (docs/vocabulary.md)",
        )  # fmt: skip


def add_sequence_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input policy")
    g.add_argument("--strip-gaps", action="store_true", help="remove alignment gaps '-' and '.'")
    g.add_argument("--unknown-to-x", action="store_true", help="map letters outside the alphabet to X")


def add_length_args(p: argparse.ArgumentParser, *, recorded: bool = False) -> None:
    """The length policy flags (:mod:`prott5nv.inference.length`), the same for every command reading
    proteins; :func:`length_options` reads them. `recorded`: the limit and windows default to those a
    saved predictor recorded (`predict`)."""
    g = p.add_argument_group("long proteins (default: refuse them, listing them)")
    limit = "the predictor's" if recorded else "model limit"
    g.add_argument("--max-length", type=int, default=None, help=f"longest protein allowed (default: {limit})")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--truncate", action="store_true", help="keep the first --max-length residues")
    how.add_argument(
        "--chunk", action="store_true",
        help="embed overlapping windows and stitch them (each residue from the window where it is farthest "
        "from an edge); poolings are over the stitched residues",
    )  # fmt: skip
    size = "the predictor's, else --max-length" if recorded else "--max-length"
    overlap = f"the predictor's, else {DEFAULT_CHUNK_OVERLAP}" if recorded else DEFAULT_CHUNK_OVERLAP
    g.add_argument("--chunk-size", type=int, default=None, help=f"window length (default: {size})")
    g.add_argument("--chunk-overlap", type=int, default=None if recorded else DEFAULT_CHUNK_OVERLAP,
                   help=f"residues shared by neighbouring windows (default: {overlap})")  # fmt: skip


def length_options(args: argparse.Namespace) -> dict:
    """The length flags as the arguments of :func:`prott5nv.inference.length.resolve`."""
    mode = "truncate" if args.truncate else "chunk" if args.chunk else "refuse"
    return {"max_length": args.max_length, "mode": mode, "chunk_size": args.chunk_size,
            "chunk_overlap": args.chunk_overlap}  # fmt: skip


def sequence_policy(args: argparse.Namespace) -> SequencePolicy:
    return SequencePolicy(strip_gaps=args.strip_gaps, unknown_to_x=args.unknown_to_x)


def add_overwrite_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (atomically; only a previous output of this command, and in a "
                   "directory only the entries it writes: other files there are kept)")  # fmt: skip


def existing(*paths: str | None) -> list[str]:
    """The arguments that name existing files or directories (inputs an output must not be; a model
    argument may also be a bundled model's name)."""
    return [p for p in paths if p and os.path.exists(p)]


def load_model(args: argparse.Namespace) -> ProtT5nv:
    from ..api import load

    sentinels = getattr(args, "sentinels", None)  # the decoding commands' --sentinels
    quantize = getattr(args, "quantize", None)  # the encoder-only commands' --quantize
    return load(args.model, device=args.device, dtype=args.dtype, sentinels=sentinels, quantize=quantize)
