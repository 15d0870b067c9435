#!/usr/bin/env bash
# The best small model we can train in about 10 minutes on one H100/H200, from the shared Swiss-Prot sample:
#   scripts/train_gpu.sh [SWISSPROT_FASTA_GZ] [WORK_DIR] [MINUTES] [PEAK_TFLOPS]
# Shape: ProtT5nv's architecture (megatron family) at d_model 512, 8 encoder + 2 decoder layers (~33M
# parameters): an encoder-heavy model, since the encoder's states are what embeddings are made of.
# Objective: mixed (half T5 span corruption, half Rostlab's whole-sequence denoising) with the auxiliary
# encoder loss, the recipe issue 17 arrived at (see the demo's model card). bf16 autocast, whole proteins
# (<= 510 residues), 128 per batch. Stops after MINUTES of training (--max-minutes: checkpoint + model
# written; rerunning resumes), prints tokens/s and MFU (model FLOPs / PEAK_TFLOPS: 989 = H100/H200 bf16
# dense), scores the held-out split and exports a native bf16 checkpoint to WORK_DIR/model_bf16.
set -euo pipefail
src=${1:-../shared/data/swissprot_dev_100k.fasta.gz}
work=${2:-runs/gpu}
minutes=${3:-9}
peak=${4:-989}
mkdir -p "$work"
[ -f "$work/data/manifest.json" ] || prott5nv preprocess "$src" -o "$work/data" --max-length 512 --val 1000 --test 2000 --seed 0
prott5nv pretrain --data "$work/data" --out "$work/run" --device cuda --precision bf16 --preset small \
  --model-override d_model=512 --model-override d_ff=2048 --model-override num_heads=8 \
  --model-override num_layers=8 --model-override num_decoder_layers=2 --position-init sinusoidal \
  --objective mixed --encoder-loss-weight 1.0 --dropout 0.0 --seq-length 512 --micro-batch-size 128 \
  --lr 1e-3 --warmup-steps 300 --max-steps 100000 --max-minutes "$minutes" --num-workers 4 \
  --val-every 500 --val-samples 1000 --save-every 500 --keep-last 2 --log-every 20 --seed 0
python - "$work/run/metrics.jsonl" "$peak" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line][1:]  # first row: warm-up
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
tflops = sum(r["model_tflops_per_s"] for r in rows) / len(rows)
print(f"training: {tps:,.0f} tokens/s, {tflops:.1f} model TFLOP/s, MFU {100 * tflops / float(sys.argv[2]):.1f}% "
      f"(peak {sys.argv[2]} TFLOP/s) over {len(rows)} metrics rows")
PY
prott5nv convert "$work/run/model" "$work/model_bf16" --dtype bfloat16 --overwrite
echo "model: $work/model_bf16; check it with benchmarks/localization_probe.py and benchmarks/ss_probe.py --model $work/model_bf16"
