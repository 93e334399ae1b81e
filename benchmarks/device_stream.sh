#!/usr/bin/env bash
# The streaming engine's benchmarks on the device machine (issue 13), one part per call so each stays inside the
# 10-minute limit of a command. Wheels from benchmarks/device_wheels.sh in .whl (carried).
#   usage: benchmarks/device_stream.sh OUT PART...
#     width     DeepSeek-V3 width (hidden 7168, moe_intermediate 2048), 2 MoE layers x 32 experts, BF16:
#               ktq against bare oneshot (causal attention kept), 128 x 2048 tokens
#     deepseek  DeepSeek-V3 geometry, 2 MoE layers x 256 experts, FP8: ktq alone at the reference tool's default
#               512 x 2048 tokens, extrapolated to the 58 MoE layers of DeepSeek-V3
#     qwen      the Qwen3-30B-A3B-like model (8 layers x 64 experts, hidden 2048, moe_intermediate 768):
#               ktq against bare oneshot, 128 x 512 tokens
set -uo pipefail
out="$1"; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$out/gpu.txt"
free -g | head -2 >> "$out/gpu.txt"
for part in "$@"; do
  case "$part" in
    width) python3 benchmarks/gpu_bench.py --work /tmp/width --out "$out/width" --arch deepseek_v3 --layers 3 \
             --dense-layers 1 --experts 32 --hidden 7168 --moe-intermediate 2048 --samples 128 --seq 2048 \
             --bare causal --fill --timeout 540 ;;
    deepseek) python3 benchmarks/gpu_bench.py --work /tmp/deepseek --out "$out/deepseek" --arch deepseek_v3 \
             --dtype fp8 --layers 3 --dense-layers 1 --experts 256 --hidden 7168 --moe-intermediate 2048 \
             --samples 512 --seq 2048 --bare none --fill --extrapolate 58 --timeout 540 ;;
    qwen) python3 benchmarks/gpu_bench.py --work /tmp/qwen --out "$out/qwen" --layers 8 --experts 64 --hidden 2048 \
             --moe-intermediate 768 --samples 128 --seq 512 --bare causal --fill --timeout 540 ;;
  esac
done
