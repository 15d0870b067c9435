#!/usr/bin/env bash
# Reproduce the bundled `prott5nv-demo` model: pretrain the `small` preset on the Swiss-Prot sample on CPU.
#   scripts/train_demo.sh [SWISSPROT_FASTA_GZ] [WORK_DIR] [SHORT_STEPS] [FULL_STEPS]
# Objective `mixed` (half T5 span corruption, half Rostlab's whole-protein denoising) with the encoder loss
# (--encoder-loss-weight 1): span corruption alone made a small model's features worse than the same network
# untrained (the model card has the diagnosis). Two phases, as the model card describes:
#   1. SHORT_STEPS on the first 128 residues of each protein (64 per batch), position table started from
#      sin/cos: short contexts let attention find neighbours sooner;
#   2. FULL_STEPS on whole proteins (up to 510 residues, 32 per batch), starting from phase 1's weights.
# Rerunning resumes each phase from its latest checkpoint. At the end the held-out test split is scored
# against unigram/bigram baselines and the model is written (bf16) to src/prott5nv/pretrained/prott5nv-demo.
set -euo pipefail
src=${1:-../shared/data/swissprot_dev_100k.fasta.gz}
work=${2:-runs/demo}
short_steps=${3:-749}
full_steps=${4:-175}
export OMP_WAIT_POLICY=passive
mkdir -p "$work"
[ -f "$work/data/manifest.json" ] || prott5nv preprocess "$src" -o "$work/data" --max-length 512 --val 1000 --test 2000 --seed 0
common=(--data "$work/data" --precision bf16 --dropout 0.0 --val-samples 300 --save-every 100 --keep-last 2
        --log-every 10 --seed 0 --objective mixed --encoder-loss-weight 1.0)
prott5nv pretrain "${common[@]}" --out "$work/short" --preset small --position-init sinusoidal \
  --max-steps "$short_steps" --seq-length 130 --micro-batch-size 64 --lr 2e-3 --warmup-steps 200 --val-every 200
prott5nv pretrain "${common[@]}" --out "$work/full" --init-from "$work/short/model" \
  --max-steps "$full_steps" --seq-length 512 --micro-batch-size 32 --lr 6e-4 --warmup-steps 50 --val-every 100
python benchmarks/heldout_perplexity.py --model "$work/full/model" --data "$work/data" --seed 0
prott5nv convert "$work/full/model" src/prott5nv/pretrained/prott5nv-demo --dtype bfloat16 --overwrite
echo "check: python benchmarks/localization_probe.py --model prott5nv-demo --step0-run $work/short --skip-finetune"
echo "       python benchmarks/ss_probe.py --model prott5nv-demo --step0-run $work/short"
