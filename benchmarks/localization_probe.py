"""Subcellular localization (10 classes) with ProtT5nv features vs the amino-acid composition baseline.

Runs, on /work/shared/data/localization_dev.csv.gz (its train/val/test split), through the same code as
`prott5nv finetune` (`prott5nv.downstream.finetune_task`):

  (a) composition + logistic regression, on all rows and on the subsample used below
  (b) frozen embeddings of --model + logistic regression, + MLP, + MLP with balanced class weights
  (c) fine-tuning: the top --unfreeze-layers encoder blocks + MLP head on --finetune-train proteins cut
      to --finetune-length residues, for --finetune-epochs epochs

(b) and (c) use a seeded subsample (--max-train training proteins, --max-eval val and test proteins;
the same val/test proteins in every run) because embedding 60k proteins on a CPU takes long; proteins
longer than the model's 512 positions are cut to their first 512 residues. Embeddings are cached, so a
rerun with the same model only trains heads. Prints accuracy / macro-F1 on the test subset and the
ratio of each to the composition baseline on the same subset; writes results.json to --out-dir.

    python benchmarks/localization_probe.py --model /tmp/step_X --threads 1 [--max-train 6000 --max-eval 1500]

The equivalent commands (one run each):

    prott5nv finetune DATA --features composition --head linear -o RUN_a
    prott5nv finetune DATA --model M --head linear --max-train 6000 --max-eval 1500 -o RUN_b1
    prott5nv finetune DATA --model M --head mlp --max-train 6000 --max-eval 1500 -o RUN_b2
    prott5nv finetune DATA --model M --finetune --unfreeze-layers 2 --max-length 256 --max-epochs 2 \
        --max-train 1500 --max-eval 1500 -o RUN_c
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prott5nv.downstream.run import finetune_task
from prott5nv.downstream.training import FitOptions

DATA = Path("/work/shared/data/localization_dev.csv.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", default="prott5nv-demo", help="model for (b) and (c)")
    ap.add_argument("--max-train", type=int, default=6000)
    ap.add_argument("--max-eval", type=int, default=1500)
    ap.add_argument("--finetune-train", type=int, default=1500)
    ap.add_argument("--finetune-length", type=int, default=256)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--unfreeze-layers", type=int, default=2)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/localization_probe"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: OUT_DIR/cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache_dir or args.out_dir / "cache"
    sub = {"max_train": args.max_train, "max_eval": args.max_eval}
    runs = [
        ("a", "composition + logistic, all rows", dict(features="composition"), FitOptions(head="linear")),
        ("a", "composition + logistic, subsample", dict(features="composition", **sub), FitOptions(head="linear")),
        ("b", "embeddings + logistic", dict(model=args.model, **sub), FitOptions(head="linear")),
        ("b", "embeddings + MLP", dict(model=args.model, **sub), FitOptions(head="mlp")),
        ("b", "embeddings + MLP, class weights", dict(model=args.model, **sub),
         FitOptions(head="mlp", class_weights=True)),
    ]  # fmt: skip
    if not args.skip_finetune:
        ft = FitOptions(head="mlp", finetune=True, unfreeze_layers=args.unfreeze_layers,
                        max_epochs=args.finetune_epochs, batch_size=32)  # fmt: skip
        runs.append(("c", f"fine-tune top {args.unfreeze_layers} blocks + MLP ({args.finetune_train} train, "
                     f"<= {args.finetune_length} res, {args.finetune_epochs} epochs)",
                     dict(model=args.model, max_train=args.finetune_train, max_eval=args.max_eval,
                          max_length=args.finetune_length), ft))  # fmt: skip
    results = []
    for i, (group, name, kwargs, opts) in enumerate(runs):
        opts.seed = args.seed
        start = time.perf_counter()
        summary = finetune_task(args.data, args.out_dir / f"run_{i}", options=opts, cache_dir=cache, **kwargs)
        test = summary.metrics["test"]
        row = {"group": group, "run": name, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
               "n_test": test["n"], "train": summary.counts["train"], "best_epoch": summary.best_epoch,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        results.append(row)
        print(f"({group}) {name}: test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f} "
              f"(n={row['n_test']}, {row['train']} train, {row['seconds']} s)", flush=True)  # fmt: skip
    base = results[1]
    print(f"\nmodel {args.model}; ratios to composition + logistic on the same test subset "
          f"(accuracy {base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f}):")  # fmt: skip
    for r in results[2:]:
        print(f"  {r['run']}: accuracy x{r['accuracy'] / base['accuracy']:.3f}, "
              f"macro-F1 x{r['macro_f1'] / max(base['macro_f1'], 1e-9):.3f}")  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps({"model": args.model, "args": vars(args) | {
        "data": str(args.data), "out_dir": str(args.out_dir), "cache_dir": str(cache)}, "results": results},
        indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
