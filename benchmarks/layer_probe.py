"""Where does the residue information go? Per-layer linear probes of a model's mean embeddings, beside its
own untrained copy (step 0) and the amino-acid composition baseline, in one run.

For each encoder layer's output (0 = the embedding layer, then each block; the last row is after the final
norm, what `embed` returns) of each model: (1) logistic regression (standardised features) for the
10-class localization task (`localization_dev.csv.gz`, a seeded subsample of its train and test splits,
first 510 residues), accuracy and macro-F1 on the test subsample; (2) a ridge regression from the mean
embedding to the protein's 20 amino-acid frequencies, R² on the test subsample: does the embedding still
encode composition? A trained model whose rows fall below its step-0 rows has lost information.

    python benchmarks/layer_probe.py --model prott5nv-demo --step0-run RUN_DIR --threads 2

Needs scikit-learn (`pip install 'prott5nv[bench]'`). `--model` may be repeated (e.g. checkpoints of one
run: RUN/checkpoints/step_00000100 ...); the step-0 rows come from `--step0-run` (the exact initial
network of that pretraining run) or the first model re-initialised (`--init-seed`).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

import prott5nv
from prott5nv.downstream.features import save_untrained

DATA = Path(__file__).resolve().parents[1] / "../shared/data/localization_dev.csv.gz"
STANDARD = "ACDEFGHIKLMNPQRSTVWY"


def composition(seq: str) -> np.ndarray:
    return np.array([seq.count(a) for a in STANDARD], float) / max(len(seq), 1)


def layer_means(model: prott5nv.ProtT5nv, seqs: list[str], batch: int = 16) -> list[np.ndarray]:
    """Mean over residues of every encoder layer's output, ``[layers + 2]`` arrays of ``[N, D]``."""
    net = model.model
    captured: dict[int, torch.Tensor] = {}
    hooks = [net.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__(0, o))]
    for k, block in enumerate(net.encoder.blocks, start=1):
        hooks.append(block.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o)))
    order = np.argsort([len(s) for s in seqs])
    out: list[list[np.ndarray]] = [[] for _ in range(len(net.encoder.blocks) + 2)]
    rows = []
    try:
        for a in range(0, len(seqs), batch):
            idx = order[a : a + batch]
            hiddens, mask = model.seqs_to_hiddens([seqs[i] for i in idx])
            m = mask.float()[..., None]
            n = m.sum(1)
            layers = [captured[k][:, : mask.shape[1]].float() for k in sorted(captured)] + [hiddens]
            for k, h in enumerate(layers):
                out[k].append(((h * m).sum(1) / n).numpy())
            rows.append(idx)
    finally:
        for h in hooks:
            h.remove()
    inverse = np.argsort(np.concatenate(rows))
    return [np.concatenate(parts)[inverse] for parts in out]


def probe(xtr: np.ndarray, xte: np.ndarray, ytr: list[str], yte: list[str], ctr: np.ndarray, cte: np.ndarray):
    scale = StandardScaler().fit(xtr)
    a, b = scale.transform(xtr), scale.transform(xte)
    pred = LogisticRegression(max_iter=2000).fit(a, ytr).predict(b)
    r2 = Ridge(alpha=1.0).fit(a, ctr).score(b, cte)
    return accuracy_score(yte, pred), f1_score(yte, pred, average="macro"), r2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", action="append", help="trained model(s) (repeatable; default prott5nv-demo)")
    ap.add_argument("--step0-run", type=Path, default=None, help="pretraining run whose initial network is step 0")
    ap.add_argument("--init-seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=2500)
    ap.add_argument("--max-test", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or ["prott5nv-demo"]
    with gzip.open(args.data, "rt") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(args.seed)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    train = [train[i] for i in rng.choice(len(train), min(args.max_train, len(train)), replace=False)]
    test = [test[i] for i in rng.choice(len(test), min(args.max_test, len(test)), replace=False)]
    clean = [("".join(c if c in STANDARD else "X" for c in r["sequence"])[:510]) for r in train + test]
    str_, ste = clean[: len(train)], clean[len(train) :]
    ytr, yte = [r["location"] for r in train], [r["location"] for r in test]
    ctr, cte = np.stack([composition(s) for s in str_]), np.stack([composition(s) for s in ste])
    acc, f1, _ = probe(ctr, cte, ytr, yte, ctr, cte)
    print(f"{len(train)} train / {len(test)} test proteins of {args.data.name}")
    print(f"{'features':<58} {'layer':>5} {'accuracy':>8} {'macro-F1':>8} {'comp. R2':>8}")
    print(f"{'amino-acid composition':<58} {'':>5} {acc:8.3f} {f1:8.3f} {1.0:8.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        step0 = save_untrained(models[0], Path(tmp) / "step0", seed=args.init_seed, run=args.step0_run)
        for name, path in [("step 0 of " + models[0], step0), *[(m, m) for m in models]]:
            model = prott5nv.load(path, dtype="float32", device="cpu")
            ftr, fte = layer_means(model, str_), layer_means(model, ste)
            for k in range(len(ftr)):
                acc, f1, r2 = probe(ftr[k], fte[k], ytr, yte, ctr, cte)
                label = "final" if k == len(ftr) - 1 else str(k)
                print(f"{name[-58:]:<58} {label:>5} {acc:8.3f} {f1:8.3f} {r2:8.3f}", flush=True)


if __name__ == "__main__":
    main()
