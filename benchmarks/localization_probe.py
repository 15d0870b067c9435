"""Subcellular localization (10 classes): a model's frozen features vs its own untrained self and the
no-model baselines, in one run.

Runs, on ../shared/data/localization_dev.csv.gz (relative to the repository root; its train/val/test
split), through the same code as `prott5nv finetune` (`prott5nv.downstream.finetune_task`):

  (a) composition + logistic regression on all rows (the data's reference point), and on the subsample
  (a) composition + dipeptide frequencies (420 features) + logistic regression, on the subsample
  (b) the step-0 model: --model's network at its own initialisation (`save_untrained`, seed
      --init-seed), frozen mean embeddings + logistic regression
  (c) frozen mean embeddings of --model + logistic regression, + MLP, + MLP with balanced class weights
  (d) fine-tuning (optional, --skip-finetune): the top --unfreeze-layers encoder blocks + MLP head on
      --finetune-train proteins cut to --finetune-length residues, for --finetune-epochs epochs

Every row but the first uses the same seeded subsample (--max-train training proteins, --max-eval val and
test proteins) because embedding 60k proteins on a CPU takes long; proteins longer than the model's 512
positions are cut to their first 512 residues. Embeddings are cached (keyed by the model's weights, so
the untrained copy never meets the trained model's entries): a rerun only trains heads. Prints a table of
accuracy / macro-F1 on the test subsample with the ratio to composition + logistic on the same proteins;
writes results.json to --out-dir.

    python benchmarks/localization_probe.py --model prott5nv-demo --threads 1 --max-train 6000 --max-eval 1500

The equivalent commands (one run each; M0 = the untrained copy, written by
`prott5nv.downstream.save_untrained(M, "M0")`):

    prott5nv finetune DATA --features composition --head linear -o RUN
    prott5nv finetune DATA --features dipeptide --head linear --max-train 6000 --max-eval 1500 -o RUN
    prott5nv finetune DATA --model M0 --head linear --max-train 6000 --max-eval 1500 -o RUN
    prott5nv finetune DATA --model M --head mlp --max-train 6000 --max-eval 1500 -o RUN
    prott5nv finetune DATA --model M --finetune --unfreeze-layers 2 --max-length 256 --truncate --max-epochs 2 \
        --max-train 1500 --max-eval 1500 -o RUN
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prott5nv.downstream.features import save_untrained
from prott5nv.downstream.run import finetune_task
from prott5nv.downstream.training import FitOptions

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "../shared/data/localization_dev.csv.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="default: ../shared/data/localization_dev.csv.gz "
                    "beside the repository")  # fmt: skip
    ap.add_argument("--model", default="prott5nv-demo", help="the trained model (name or path)")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the untrained copy's initialisation")
    ap.add_argument("--step0-run", type=Path, default=None, help="the pretraining run --model came from: its exact "
                    "initial network is the step-0 row (default: --model re-initialised with --init-seed)")
    ap.add_argument("--max-train", type=int, default=6000)
    ap.add_argument("--max-eval", type=int, default=1500, help="val and test proteins (each)")
    ap.add_argument("--finetune-train", type=int, default=1500)
    ap.add_argument("--finetune-length", type=int, default=256)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--unfreeze-layers", type=int, default=2)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--skip-all-rows", action="store_true", help="skip composition + logistic on all rows")
    ap.add_argument("--int8", action="store_true", help="add --model with its encoder in int8 (bf16 + --quantize "
                    "int8), frozen mean + logistic, beside the float32 row: the int8 check")  # fmt: skip
    ap.add_argument("--minimal", action="store_true", help="only composition, the model's frozen mean + logistic "
                    "(and --int8's row): the cheap rows")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/localization_probe"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: OUT_DIR/cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data.resolve()
    cache = args.cache_dir or args.out_dir / "cache"
    step0 = save_untrained(args.model, args.out_dir / "step0_model", seed=args.init_seed, run=args.step0_run)
    sub = {"max_train": args.max_train, "max_eval": args.max_eval}
    cut = {"long_policy": "truncate"}  # proteins past the model's limit: their first residues, as before
    linear = FitOptions(head="linear")
    runs = [
        ("composition", "logistic", dict(features="composition", **sub), linear),
        ("composition+dipeptide", "logistic", dict(features="dipeptide", **sub), linear),
        ("step-0 model, frozen mean", "logistic", dict(model=str(step0), **sub, **cut), linear),
        ("model, frozen mean", "logistic", dict(model=args.model, **sub, **cut), linear),
        ("model, frozen mean", "MLP", dict(model=args.model, **sub, **cut), FitOptions(head="mlp")),
        ("model, frozen mean", "MLP, class weights", dict(model=args.model, **sub, **cut),
         FitOptions(head="mlp", class_weights=True)),
    ]  # fmt: skip
    if args.int8:
        from prott5nv.api import load

        int8 = load(args.model, dtype="bfloat16", quantize="int8")
        runs.insert(4, ("model int8 (bf16 + --quantize int8), frozen mean", "logistic", dict(model=int8, **sub, **cut),
                        FitOptions(head="linear")))  # fmt: skip
    if args.minimal:
        runs = [r for r in runs if r[0] in ("composition", "model, frozen mean") and r[1] == "logistic"
                or r[0].startswith("model int8")]  # fmt: skip
        args.skip_all_rows = args.skip_finetune = True
    if not args.skip_all_rows:
        runs.insert(0, ("composition, all rows", "logistic", dict(features="composition"), FitOptions(head="linear")))
    if not args.skip_finetune:
        ft = FitOptions(head="mlp", finetune=True, unfreeze_layers=args.unfreeze_layers,
                        max_epochs=args.finetune_epochs, batch_size=32)  # fmt: skip
        runs.append((f"model, fine-tuned top {args.unfreeze_layers} blocks ({args.finetune_train} train, "
                     f"<= {args.finetune_length} res, {args.finetune_epochs} epochs)", "MLP",
                     dict(model=args.model, max_train=args.finetune_train, max_eval=args.max_eval,
                          max_length=args.finetune_length, long_policy="truncate"), ft))  # fmt: skip
    results = []
    for i, (features, head, kwargs, opts) in enumerate(runs):
        opts.seed = args.seed
        start = time.perf_counter()
        summary = finetune_task(data, args.out_dir / f"run_{i}", options=opts, cache_dir=cache, **kwargs)
        test = summary.metrics["test"]
        row = {"features": features, "head": head, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
               "n_test": test["n"], "train": summary.counts["train"], "best_epoch": summary.best_epoch,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        results.append(row)
        print(f"{features} + {head}: test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f} "
              f"(n={row['n_test']}, {row['train']} train, {row['seconds']} s)", flush=True)  # fmt: skip
    base = next(r for r in results if r["features"] == "composition")
    for r in results:
        same = r["n_test"] == base["n_test"] and "all rows" not in r["features"]
        r["accuracy_ratio"] = r["accuracy"] / base["accuracy"] if same else None
        r["macro_f1_ratio"] = r["macro_f1"] / max(base["macro_f1"], 1e-9) if same else None
    print(f"\n{data.name}, model {args.model} (step 0: {step0}, seed {args.init_seed}); test split "
          f"subsample of {base['n_test']} proteins; ratios to composition + logistic on the same proteins\n")
    print("| features | head | train | accuracy | macro-F1 | x accuracy | x macro-F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = (f"{r['accuracy_ratio']:.3f} | {r['macro_f1_ratio']:.3f}" if r["accuracy_ratio"] is not None
                 else f"(n={r['n_test']}) | ")  # fmt: skip
        print(f"| {r['features']} | {r['head']} | {r['train']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {ratio} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"data": str(data), "out_dir": str(args.out_dir), "cache_dir": str(cache),
                             "step0_model": str(step0)}  # fmt: skip
    report = {"model": args.model, "args": settings, "results": results}
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
