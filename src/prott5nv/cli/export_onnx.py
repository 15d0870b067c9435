"""`prott5nv export-onnx MODEL -o encoder.onnx`: the encoder as ONNX (dynamic batch and length)."""

from __future__ import annotations

import argparse

from ..fsutil import check_output
from .common import add_overwrite_arg, existing


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export the encoder to ONNX",
        description="Export MODEL's encoder (float32) to ONNX: inputs input_ids and attention_mask (int64, "
        "[batch, length]), output hidden ([batch, length, d_model]); batch and length are dynamic. Needs "
        "the onnx package (pip install 'prott5nv[onnx]').",
    )
    p.add_argument("model", metavar="MODEL", help="bundled model name, checkpoint directory, .nemo or HF T5 directory")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    add_overwrite_arg(p)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..inference.onnx_export import export_onnx

    check_output(args.output, inputs=existing(args.model), overwrite=args.overwrite)
    model, _ = load_checkpoint(args.model)
    path = export_onnx(model, args.output, opset=args.opset)
    print(f"exported the encoder of {args.model} ({model.config.num_layers} layers) -> {path}")
    return 0
