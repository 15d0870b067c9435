#!/usr/bin/env bash
# Reproduce the bundled `prott5nv-demo` model: pretrain the `small` preset on the Swiss-Prot sample on CPU.
#   scripts/train_demo.sh [SWISSPROT_FASTA_GZ] [WORK_DIR] [MAX_STEPS]
# Rerunning resumes from the latest checkpoint. At the end the model is written (bf16) to
# src/prott5nv/pretrained/prott5nv-demo and scored on the held-out test split.
set -euo pipefail
src=${1:-../shared/data/swissprot_dev_100k.fasta.gz}
work=${2:-runs/demo}
steps=${3:-7000}
mkdir -p "$work"
[ -f "$work/data/manifest.json" ] || prott5nv preprocess "$src" -o "$work/data" --max-length 512 --val 1000 --test 2000 --seed 0
OMP_WAIT_POLICY=passive prott5nv pretrain --data "$work/data" --out "$work/run" --preset small --max-steps "$steps" \
  --micro-batch-size 32 --lr 1e-3 --warmup-steps 200 --precision bf16 --dropout 0.0 \
  --val-every 500 --val-samples 500 --save-every 100 --keep-last 2 --log-every 25 --seed 0
python - "$work" <<'PY'
import sys
from prott5nv.data.store import SequenceStore
from prott5nv.fasta import write_fasta
store = SequenceStore.open(f"{sys.argv[1]}/data", "test")
write_fasta([(store.id(i), store.sequence(i)) for i in range(len(store))], f"{sys.argv[1]}/heldout_test.fasta")
PY
prott5nv score "$work/heldout_test.fasta" --model "$work/run/model" -o "$work/heldout_scores.csv" --seed 0
prott5nv convert "$work/run/model" src/prott5nv/pretrained/prott5nv-demo --dtype bfloat16 --overwrite
