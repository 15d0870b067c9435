"""`prott5nv info MODEL_OR_PRESET [--json]`: configuration and parameter count."""

from __future__ import annotations

import argparse
import json

from ..model.config import PRESETS, preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's or preset's configuration and parameter count",
        description=f"MODEL_OR_PRESET: a preset ({', '.join(PRESETS)}), a bundled model name, a native "
        "checkpoint directory, a .nemo archive or an HF T5 directory.",
    )
    p.add_argument("model", metavar="MODEL_OR_PRESET")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def describe(name: str) -> dict:
    from ..checkpoint import load_checkpoint
    from ..model.t5 import count_parameters

    if name in PRESETS:
        cfg = preset(name)
        info = {"name": name, "kind": "preset", **cfg.to_dict(), "parameters": count_parameters(cfg)}
    else:
        model, tokenizer = load_checkpoint(name)
        info = {"name": name, "kind": "checkpoint", **model.describe(), "tokenizer": tokenizer.layout,
                "sentinels": tokenizer.sentinels}  # fmt: skip
    info.pop("extra", None)
    return info


def run(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        print(f"{k:<{width}}  {v}")
    return 0
