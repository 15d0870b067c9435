"""Held-out masked perplexity of a model against unigram and bigram baselines on the *same* residues.

The model is scored as `prott5nv score` does (span corruption: 15% of each protein's first 510 residues
masked as single-residue spans, masks fixed by `--seed` and the sequence). The baselines predict each of
those masked residues from residue frequencies of the training split: unigram p(r), and bigram
p(r | the true residue to its left) (add-one smoothed; the first residue falls back to unigram). The
bigram baseline sees a true neighbour even where the model's input has a sentinel there: it is a
deliberately strong baseline.

With `--encoder`, the same residues are also predicted from the encoder alone (each masked residue
replaced by `<mask>` in place, as the denoise objective does, read through the LM head at its position):
the number that shows whether an encoder trained with `--encoder-loss-weight` uses context at all (a
model on the unigram plateau scores the unigram perplexity here). Meaningless for models whose encoder
states were never trained against the LM head (span corruption only).

    python benchmarks/heldout_perplexity.py --model prott5nv-demo --data DATA_DIR --threads 2

DATA_DIR is a `prott5nv preprocess` store (its `test` split is scored, its `train` split gives the
frequencies), e.g. the demo's: `prott5nv preprocess ../shared/data/swissprot_dev_100k.fasta.gz -o DATA_DIR
--max-length 512 --val 1000 --test 2000 --seed 0`.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import prott5nv
from prott5nv.data.store import SequenceStore
from prott5nv.inference.score import make_masker, mask_protein, residue_nll

STANDARD = "ACDEFGHIKLMNPQRSTVWY"


@torch.no_grad()
def encoder_nll(model: prott5nv.ProtT5nv, ids: np.ndarray, where: np.ndarray) -> float:
    """Summed NLL of the residues at `where`, each replaced by `<mask>`, read from the encoder's states."""
    net, tok = model.model, model.tokenizer
    if tok.mask_id is None:
        raise SystemExit(f"{model.name}: its vocabulary has no <mask> token: --encoder does not apply")
    x = torch.as_tensor(ids, dtype=torch.long)[None].clone()
    target = x[0, where].clone()
    x[0, where] = tok.mask_id
    logits = net.lm_logits(net.encode(x)).float()[0, where]
    return float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="prott5nv-demo")
    ap.add_argument("--data", required=True, help="preprocessed store: test split scored, train split counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-proteins", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoder", action="store_true", help="also score the residues from the encoder alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = prott5nv.load(args.model, dtype="float32", device="cpu")
    tok = model.tokenizer
    train, test = SequenceStore.open(args.data, "train"), SequenceStore.open(args.data, "test")
    index = {c: i for i, c in enumerate(STANDARD)}
    uni = np.ones(21)
    bi = np.ones((21, 21))  # 20 standard residues + "other"
    for i in range(len(train)):
        codes = np.array([index.get(c, 20) for c in train.sequence(i)])
        uni += np.bincount(codes, minlength=21)
        np.add.at(bi, (codes[:-1], codes[1:]), 1)
    uni /= uni.sum()
    bi /= bi.sum(1, keepdims=True)
    masker = make_masker(model, args.seed)
    n = len(test) if args.max_proteins is None else min(args.max_proteins, len(test))
    model_nll = uni_nll = bi_nll = enc_nll = 0.0
    count = 0
    for a in range(0, n, args.batch):
        seqs = [test.sequence(i) for i in range(a, min(n, a + args.batch))]
        samples = [mask_protein(masker, tok.encode_residues(s), s) for s in seqs]
        for seq, sample, (nll, k) in zip(seqs, samples, residue_nll(model, samples), strict=True):
            codes = np.array([index.get(c, 20) for c in seq[: masker.max_tokens]])
            where = np.flatnonzero(np.isin(sample.text_enc, tok.sentinel_ids))  # single-residue spans
            assert len(where) == k
            model_nll += nll
            uni_nll -= np.log(uni[codes[where]]).sum()
            left = np.where(where > 0, codes[np.maximum(where - 1, 0)], -1)
            probs = np.where(left >= 0, bi[np.maximum(left, 0), codes[where]], uni[codes[where]])
            bi_nll -= np.log(probs).sum()
            if args.encoder:
                enc_nll += encoder_nll(model, tok.encode_residues(seq[: masker.max_tokens]), where)
            count += k
    print(f"{args.model}: {n} held-out proteins, {count:,} masked residues (seed {args.seed})")
    rows = [("model", model_nll), ("unigram (train frequencies)", uni_nll), ("bigram (true left neighbour)", bi_nll)]
    if args.encoder:
        rows.append(("encoder alone (<mask> in place)", enc_nll))
    for name, total in rows:
        print(f"  {name:<32} perplexity {math.exp(total / count):7.3f}")


if __name__ == "__main__":
    main()
