"""Arguments and helpers shared by several commands (one definition, so flags mean the same everywhere)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..sequence import SequencePolicy

if TYPE_CHECKING:  # the model stack (torch) is imported by the commands that run a model, when they run
    from ..api import ProtT5nv

#: The names of :data:`prott5nv.device.DTYPES`, without importing torch to build the command line.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = "prott5nv-demo") -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=default_model,
        help="bundled model name, native checkpoint directory, .nemo archive or HF T5 directory "
        f"(default: {default_model})",
    )  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g.add_argument(
        "--dtype", default="float32", choices=[*DTYPE_NAMES, "auto"],
        help="compute precision (bfloat16 is the CPU half precision; float16 needs CUDA; auto: bfloat16 "
        "where supported -- CUDA, CPUs with AVX512-BF16/AMX -- else float32)",
    )  # fmt: skip


def add_sequence_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input policy")
    g.add_argument("--strip-gaps", action="store_true", help="remove alignment gaps '-' and '.'")
    g.add_argument("--unknown-to-x", action="store_true", help="map letters outside the alphabet to X")


def sequence_policy(args: argparse.Namespace) -> SequencePolicy:
    return SequencePolicy(strip_gaps=args.strip_gaps, unknown_to_x=args.unknown_to_x)


def load_model(args: argparse.Namespace) -> ProtT5nv:
    from ..api import load

    return load(args.model, device=args.device, dtype=args.dtype)
