#!/usr/bin/env bash
# First call on the device machine: the carried wheels import, --force_cpu really hides the H100 (torch imported
# first), a CUDA initialised before ktq is refused, the plan sees the GPU, and the tiny benchmark runs end to end.
#   usage (on the device, after installing the wheels): benchmarks/device_smoke.sh OUT
set -uo pipefail
out="$1"; mkdir -p "$out"
py=python3
$py -c "import torch, transformers, llmcompressor, datasets, pyarrow, typer, compressed_tensors as ct
print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__,
      'pyarrow', pyarrow.__version__, 'typer', typer.__version__, 'ct', ct.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
$py -m ktq sample /tmp/tiny --layers 2 --experts 8 --hidden 256 --moe-intermediate 256 >/dev/null
args="'gpu','--model_id','/tmp/tiny','--output_dir','/tmp/tiny-out','--dataset','x','--quant_method','RTN','--dry_run'"
echo "== force_cpu, torch imported first"
$py -c "import torch; from ktq.cli import main
try: main([$args,'--force_cpu'])
except SystemExit as e: print('exit', e.code, 'cuda visible:', torch.cuda.is_available())" 2>&1 | grep -E "plan|exit"
echo "== force_cpu after CUDA was initialised (must refuse)"
$py -c "import torch; torch.cuda.init(); from ktq.cli import main; main([$args,'--force_cpu'])"; echo "exit $?"
echo "== plan on the GPU"
$py -m ktq gpu --model_id /tmp/tiny --output_dir /tmp/tiny-out --dataset x --quant_method RTN --dry_run 2>&1 | head -4
echo "== tiny benchmark"
$py benchmarks/gpu_bench.py --work /tmp/bench-tiny --out "$out" --layers 2 --experts 8 --hidden 256 \
  --moe-intermediate 256 --samples 8 --seq 64 --schemes W4A16 --timeout 240 | tail -5
