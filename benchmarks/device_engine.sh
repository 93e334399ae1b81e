#!/usr/bin/env bash
# The engine benchmark (benchmarks/engine_bench.py) on the device machine, within one command's 10 minutes.
# Wheels from benchmarks/device_wheels.sh in .whl (carried); main's ktq before the chunked engine in .whl-base
# (carried, for the `base` run only).
#   usage: benchmarks/device_engine.sh OUT small|deepseek RUN...
#     small     DeepSeek-V3 layout at small width (3 layers, 32 experts, hidden 1024), FP8, 64 x 512 tokens: a smoke test
#     deepseek  DeepSeek-V3 geometry, 2 MoE layers x 256 experts, FP8, 512 x 2048 tokens (the reference tool's default)
set -uo pipefail
out="$1"; size="$2"; shift 2
repo=$(pwd)
mkdir -p "$out"
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "$@"; }
[ -d /tmp/site ] || pip --target /tmp/site .whl/*.whl || exit 1
pip --target /tmp/site .whl/ktq-*.whl || exit 1  # this checkout's ktq, every call
if [ -d .whl-base ]; then  # only for the `base` run
  [ -d /tmp/base-site ] || pip --target /tmp/base-site .whl-base/ktq-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/machine.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$out/machine.txt"
free -g | head -2 >> "$out/machine.txt"
cd /tmp  # not the checkout: `python -m ktq` must find the installed package (ktq.kernels is mapped at install)
case "$size" in
  small) sample="--work /tmp/eb-small --arch deepseek_v3 --dtype fp8 --layers 3 --dense-layers 1 --experts 32
                 --hidden 1024 --moe-intermediate 512 --samples 64 --seq 512 --fill" ;;
  deepseek) sample="--work /tmp/eb --arch deepseek_v3 --dtype fp8 --layers 3 --dense-layers 1 --experts 256
                    --hidden 7168 --moe-intermediate 2048 --samples 512 --seq 2048 --fill" ;;
esac
python3 "$repo/benchmarks/engine_bench.py" $sample --out "$out/$size" --base-site /tmp/base-site --runs "$@"
