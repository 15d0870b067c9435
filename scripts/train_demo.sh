#!/usr/bin/env bash
# Reproduce the bundled `prott5nv-demo` model: pretrain the `small` preset on the Swiss-Prot sample on CPU.
#   scripts/train_demo.sh [SWISSPROT_FASTA_GZ] [WORK_DIR] [SHORT_STEPS] [FULL_STEPS]
# Two phases, as the model card (src/prott5nv/pretrained/prott5nv-demo/README.md) describes:
#   1. SHORT_STEPS on the first 128 residues of each protein (96 per batch), position table started from
#      sin/cos: short contexts let attention find neighbours and the decoder find its sentinels sooner;
#   2. FULL_STEPS on whole proteins (up to 510 residues, 32 per batch), starting from phase 1's weights.
# Rerunning resumes each phase from its latest checkpoint. At the end the held-out test split is scored
# and the model is written (bf16) to src/prott5nv/pretrained/prott5nv-demo.
set -euo pipefail
src=${1:-../shared/data/swissprot_dev_100k.fasta.gz}
work=${2:-runs/demo}
short_steps=${3:-1900}
full_steps=${4:-600}
export OMP_WAIT_POLICY=passive
mkdir -p "$work"
[ -f "$work/data/manifest.json" ] || prott5nv preprocess "$src" -o "$work/data" --max-length 512 --val 1000 --test 2000 --seed 0
common=(--data "$work/data" --precision bf16 --dropout 0.0 --val-samples 500 --save-every 100
        --keep-last 2 --log-every 25 --seed 0)
prott5nv pretrain "${common[@]}" --out "$work/short" --preset small --position-init sinusoidal \
  --max-steps "$short_steps" --seq-length 130 --seq-length-dec 48 --micro-batch-size 96 --lr 2e-3 --warmup-steps 200 --val-every 250
prott5nv pretrain "${common[@]}" --out "$work/full" --init-from "$work/short/model" \
  --max-steps "$full_steps" --seq-length 512 --seq-length-dec 256 --micro-batch-size 32 --lr 6e-4 --warmup-steps 100 --val-every 250
python - "$work" <<'PY'
import sys
from prott5nv.data.store import SequenceStore
from prott5nv.fasta import write_fasta
store = SequenceStore.open(f"{sys.argv[1]}/data", "test")
write_fasta([(store.id(i), store.sequence(i)) for i in range(len(store))], f"{sys.argv[1]}/heldout_test.fasta")
PY
prott5nv score "$work/heldout_test.fasta" --model "$work/full/model" -o "$work/heldout_scores.csv" --seed 0
prott5nv convert "$work/full/model" src/prott5nv/pretrained/prott5nv-demo --dtype bfloat16 --overwrite
