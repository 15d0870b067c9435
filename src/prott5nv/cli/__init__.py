"""The `prott5nv` command line: argument parsing and progress only, one module per command.

Each command module defines `register(subparsers)` which adds its sub-parser and sets `func`.
Errors a user can cause (:class:`~prott5nv.errors.ProtT5nvError`, and file-system errors) are printed as one line,
exit 2. Every command checks its outputs before any work (:func:`~prott5nv.fsutil.check_output`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import ProtT5nvError

#: Command modules under prott5nv.cli, in the order `--help` lists them.
COMMANDS = ("embed", "merge", "info", "preprocess", "pretrain", "convert", "generate", "infill", "score", "serve",
            "finetune", "predict", "export_onnx")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="prott5nv", description="ProtT5nv protein language model: embed, pretrain, convert, serve."
    )
    parser.add_argument("--version", action="version", version=f"prott5nv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ProtT5nvError as exc:
        print(f"prott5nv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (disk full, permissions changed mid-run): one line too
        logging.getLogger(__name__).debug("file system error", exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"prott5nv {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prott5nv {args.command}: interrupted", file=sys.stderr)
        return 130
