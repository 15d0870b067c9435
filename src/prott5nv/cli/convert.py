"""`prott5nv convert SRC DST [--to native|hf] [--dtype ...] [--merge-lora]`: change a checkpoint's format.

SRC is anything :func:`~prott5nv.checkpoint.load_checkpoint` reads (bundled name, native directory,
``.nemo`` archive, HF T5 directory) or, with ``--merge-lora``, the run directory of ``prott5nv finetune
--lora`` (its base model with the adapters folded into the encoder's weights); DST is written atomically
as a native or an HF T5 directory.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import check_output
from .common import DTYPE_NAMES, existing, precision_arg

log = logging.getLogger(__name__)

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between native, .nemo (read only) and HF T5 formats",
        description="SRC: a bundled model name, a native checkpoint directory, a .nemo archive or an HF T5 "
        "directory. DST: the directory to write (atomically). Megatron-family models (ProtT5nv, .nemo) "
        "can only be written in the native format.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", type=Path)
    p.add_argument("--to", choices=("native", "hf"), default="native", help="output format (default: native)")
    p.add_argument("--dtype", type=precision_arg, default=None, metavar="{" + ",".join(DTYPE_NAMES) + "}",
                   help="convert the weights (default: keep float32; fp32, bf16, fp16 accepted)")
    p.add_argument("--merge-lora", action="store_true", help="SRC is a `finetune --lora` run: write its base model "
                   "with the adapters merged into the encoder (the head is not part of a checkpoint)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a checkpoint directory (its checkpoint files; others there, e.g. a "
                   "model card, are kept)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint, provenance, save_pretrained
    from ..checkpoint.hf import save_hf
    from ..device import DTYPES

    dst: Path = args.dst  # a checkpoint directory: config.json in both formats
    check_output(dst, inputs=existing(args.src), overwrite=args.overwrite, kind="dir", marker="config.json")
    if args.merge_lora:
        from ..downstream.predictor import merge_lora

        model, tokenizer, merged = merge_lora(args.src)
    else:
        if (Path(args.src) / "predictor.json").is_file():
            raise ConfigError(f"{args.src}: a predictor run directory, not a checkpoint (a LoRA run is merged into "
                              "one with --merge-lora)")  # fmt: skip
        model, tokenizer = load_checkpoint(args.src)
        merged = {}
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.to == "hf":
        save_hf(model, tokenizer, dst, dtype=dtype)
    else:
        source = provenance(merged["base_model"]) if merged else provenance(args.src)
        extra = {**source, **merged, "converted_from": str(args.src)}  # keeps how the source was made
        save_pretrained(model, tokenizer, dst, dtype=dtype, extra=extra)
    log.info("wrote %s checkpoint %s (%s parameters)", args.to, dst, f"{model.num_parameters():,}")
    return 0
