#!/usr/bin/env bash
# The GPU check: about 7 minutes on one H100/H200 (each part has its own time limit; the sum is 450 s).
#   benchmarks/gpu_check.sh [OUT_DIR] [PEAK_TFLOPS]
# Run from the repository root with prott5nv installed with its test and bench extras and a CUDA PyTorch.
#   1. the machine: GPUs, driver, PyTorch, CUDA
#   2. CUDA tests (benchmarks/gpu_tests.py): embeddings in bf16/fp16 equal fp32 within tolerance (library and
#      `prott5nv embed`); a pretraining run on CUDA, and with two GPUs two nccl ranks equal to one rank
#   3. embedding throughput against transformers (fp32, and bf16 + SDPA), ProtT5nv-base shape
#   4. the same at ProtT5-XL encoder shape (1.2B parameters; bf16 weights file, shared by every contender)
#   5. training tokens/s and MFU at ProtT5nv-base (benchmarks/train_throughput.py, bf16 autocast)
# Every part runs even when an earlier one fails; OUT_DIR/summary.md collects each part's status, time and
# result lines; OUT_DIR/<part>.log has the whole output. PEAK_TFLOPS: dense bf16 peak for MFU (989: H100 SXM
# and H200).
set -uo pipefail
out=${1:-runs/gpu_check}
peak=${2:-989}
mkdir -p "$out"
summary="$out/summary.md"
export PYTHONUNBUFFERED=1
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$summary"

# part NAME SECONDS LINES COMMAND...: run COMMAND under a time limit; record status, time and the last LINES
# lines of its output in the summary
part() {
  local name=$1 limit=$2 lines=$3
  shift 3
  local start=$SECONDS status
  echo "== $name (limit ${limit} s): $*"
  if timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; fi
  {
    echo
    echo "## $name: $status, $((SECONDS - start)) s"
    echo
    echo '```'
    tail -n "$lines" "$out/$name.log"
    echo '```'
  } >> "$summary"
  echo "   $status, $((SECONDS - start)) s"
}

part machine 20 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpus\", torch.cuda.device_count())"'
part cuda_tests 100 15 python -m pytest benchmarks/gpu_tests.py -q -p no:cacheprovider
part embed_base 80 14 python benchmarks/embed_throughput.py --shape base --device cuda --proteins 2000 \
  --threads 8 --batch-tokens 16384 --contenders usual hf-bf16 ours-bf16 ours-fp16
part embed_xl 160 12 python benchmarks/embed_throughput.py --shape xl --device cuda --proteins 500 \
  --threads 8 --batch-tokens 16384 --weights-dtype bfloat16 --contenders usual hf-bf16 ours-bf16
part train_base 90 12 python benchmarks/train_throughput.py --device cuda --presets prott5nv-base \
  --precisions bf16 --dropouts 0.0 --batch-size 64 --max-residues 512 --steps 10 --peak-tflops "$peak"
echo "summary: $summary"
cat "$summary"
