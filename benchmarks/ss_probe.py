"""Per-residue 3-state secondary structure (H/E/C): a model's frozen features vs its own untrained self and
one-hot baselines, in one run.

Data: ../shared/data/secondary_structure/flip_secondary_structure_sampled.csv.gz (relative to the
repository root): FLIP's "sampled" split of the NetSurfP-2.0 proteins, train / valid, and the NEW364
test set. The target is `ss3`; residues whose `mask` is 0 (not observed in the structure) are never
scored, nor trained on. Rows, through the project's downstream code (`load_task`, `fit_frozen`, the
`linear` and `cnn` heads; early stopping on the valid subsample):

  majority class of the training residues (no features)
  one-hot of residues i-W..i+W (--window, default 7) + linear probe
  one-hot (per residue) + CNN head (two convolutions, kernel 7, 32 channels)
  the step-0 model (--model's network at its own initialisation, seed --init-seed) + linear, + CNN
  the trained --model's frozen per-residue features + linear, + CNN

Training uses a seeded subsample of --max-train train proteins and --max-val valid proteins, cut to
their first L residues (L = the model's limit, 512); the test set is whole (--max-test for a quick run):
its proteins longer than L are embedded as overlapping windows of L residues (--chunk-overlap, default
128) stitched as `prott5nv embed --chunk` does, so every row scores the same residues: every masked-in
residue of every test protein. Q3 = accuracy over those residues. Embeddings are cached (keyed by each
model's weights) in --cache-dir; a rerun only trains heads. Prints a table, writes results.json.

    python benchmarks/ss_probe.py --model prott5nv-demo --threads 1 [--max-train 3000 --max-val 500]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prott5nv.api import load
from prott5nv.downstream.features import (
    EmbeddingFeaturizer,
    OneHotFeaturizer,
    OneHotWindowFeaturizer,
    save_untrained,
)
from prott5nv.downstream.run import subsample
from prott5nv.downstream.tasks import TaskData, load_task
from prott5nv.downstream.training import FitOptions, fit_frozen

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "../shared/data/secondary_structure/flip_secondary_structure_sampled.csv.gz"


def cut_training_rows(data: TaskData, limit: int) -> tuple[TaskData, int]:
    """Train and val proteins cut to their first `limit` residues (labels too); test rows unchanged."""
    seqs, labels, cut = [], [], 0
    for s, y, split in zip(data.sequences, data.labels, data.splits, strict=True):
        if split != "test" and len(s) > limit:
            s, y, cut = s[:limit], y[:limit], cut + 1
        seqs.append(s), labels.append(y)
    return TaskData(data.task, data.ids, seqs, labels, data.splits, data.where), cut


def majority_row(data: TaskData) -> dict[str, Any]:
    labels = {s: np.concatenate([y for y, sp in zip(data.labels, data.splits, strict=True) if sp == s])
              for s in ("train", "val", "test")}  # fmt: skip
    labels = {s: y[y >= 0] for s, y in labels.items()}
    top = int(np.bincount(labels["train"]).argmax())
    return {"features": f"majority class ({data.task.classes[top]})", "head": "-",
            "q3": float((labels["test"] == top).mean()), "val_q3": float((labels["val"] == top).mean()),
            "scored": int(len(labels["test"])), "best_epoch": 0, "seconds": 0.0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="default: ../shared/data/secondary_structure/"
                    "flip_secondary_structure_sampled.csv.gz beside the repository")  # fmt: skip
    ap.add_argument("--model", default="prott5nv-demo", help="the trained model (name or path)")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the untrained copy's initialisation")
    ap.add_argument("--step0-run", type=Path, default=None, help="the pretraining run --model came from: its exact "
                    "initial network is the step-0 row (default: --model re-initialised with --init-seed)")
    ap.add_argument("--max-train", type=int, default=3000, help="training proteins (seeded subsample)")
    ap.add_argument("--max-val", type=int, default=500, help="valid proteins for early stopping")
    ap.add_argument("--max-test", type=int, default=None, help="test proteins (default: all 364)")
    ap.add_argument("--window", type=int, default=7, help="half-width of the one-hot window")
    ap.add_argument("--chunk-overlap", type=int, default=128, help="overlap of the windows of long test proteins")
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-onehot", action="store_true", help="skip the one-hot rows (e.g. measured already)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/ss_probe"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: OUT_DIR/cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.data.resolve()
    cache = args.cache_dir or args.out_dir / "cache"
    full = load_task(path, target="ss3", mask_column="mask", seed=args.seed)
    data = subsample(full, args.seed, train=args.max_train, val=args.max_val, test=args.max_test)
    trained = load(args.model, device=args.device)
    step0_dir = save_untrained(args.model, args.out_dir / "step0_model", seed=args.init_seed, run=args.step0_run)
    step0 = load(step0_dir, device=args.device)
    limit = trained.max_length or max(map(len, data.sequences))
    data, cut = cut_training_rows(data, limit)
    test = [i for i, s in enumerate(data.splits) if s == "test"]
    long_test = sum(len(data.sequences[i]) > limit for i in test)
    masked_in = sum(int((data.labels[i] >= 0).sum()) for i in test)
    residues = sum(len(data.sequences[i]) for i in test)
    counts = data.counts()
    handling = (f"train/val proteins cut to their first {limit} residues ({cut} cut); test proteins whole: "
                f"{long_test} longer than {limit} embedded as overlapping windows of {limit} residues (overlap "
                f"{args.chunk_overlap}) stitched as embed --chunk; every row scores the same residues")  # fmt: skip
    print(f"{path.name}: {counts['train']} train / {counts['val']} valid / {counts['test']} test proteins; "
          f"test: {residues} residues, {masked_in} scored (mask 1)\n{handling}", flush=True)  # fmt: skip

    def embeddings(model: Any, name: str) -> EmbeddingFeaturizer:
        return EmbeddingFeaturizer(model, batch_tokens=args.batch_tokens, cache_dir=cache, model_name=name,
                                   chunk_overlap=args.chunk_overlap)  # fmt: skip

    w = args.window
    rows = [
        (f"one-hot window ±{w}", "linear", lambda: OneHotWindowFeaturizer(w)),
        ("one-hot", "cnn", lambda: OneHotFeaturizer()),
        ("step-0 model", "linear", lambda: embeddings(step0, str(step0_dir))),
        ("step-0 model", "cnn", lambda: embeddings(step0, str(step0_dir))),
        ("model", "linear", lambda: embeddings(trained, args.model)),
        ("model", "cnn", lambda: embeddings(trained, args.model)),
    ]
    if args.skip_onehot:
        rows = rows[2:]
    results = [majority_row(data)]
    print(f"{results[0]['features']}: test Q3 {results[0]['q3']:.4f}", flush=True)
    for features, head, make in rows:
        start = time.perf_counter()
        opts = FitOptions(head=head, max_epochs=args.max_epochs, patience=args.patience, seed=args.seed)
        fit = fit_frozen(data, make(), opts)
        m = fit.metrics
        row = {"features": features, "head": head, "q3": m["test"]["accuracy"], "val_q3": m["val"]["accuracy"],
               "scored": m["test"]["n"], "macro_f1": m["test"]["macro_f1"], "best_epoch": fit.best_epoch,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        results.append(row)
        print(f"{features} + {head}: test Q3 {row['q3']:.4f} ({row['scored']} residues), val Q3 "
              f"{row['val_q3']:.4f}, best epoch {row['best_epoch']}, {row['seconds']} s", flush=True)  # fmt: skip
    if any(r["scored"] != masked_in for r in results):
        print(f"WARNING: not every row scored the {masked_in} masked-in test residues")
    n_test = counts["test"]
    which = f"a subsample of {n_test} NEW364 proteins" if args.max_test else f"NEW364 ({n_test} proteins)"
    print(f"\nmodel {args.model}; step 0: {step0_dir} (seed {args.init_seed}); test: {which}, Q3 over its "
          f"{masked_in} scored residues\n")
    print("| features | head | test Q3 | scored residues | val Q3 | best epoch | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['features']} | {r['head']} | {r['q3']:.4f} | {r['scored']} | {r['val_q3']:.4f} | "
              f"{r['best_epoch']} | {r['seconds']} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"data": str(path), "out_dir": str(args.out_dir), "cache_dir": str(cache),
                             "step0_model": str(step0_dir)}  # fmt: skip
    report = {"model": args.model, "args": settings, "counts": counts, "long_proteins": handling,
              "test_residues": residues, "scored_residues": masked_in, "results": results}  # fmt: skip
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
