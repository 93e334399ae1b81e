#!/usr/bin/env bash
# On the device machine: install the carried wheels, then `ktq gpu --nproc N` (the distributed path) against the plain
# run on the benchmark sample.   usage: benchmarks/device_ddp.sh WHEELS OUT [NPROCS...]   (default NPROCS: 1)
set -uo pipefail
wheels="$(realpath "$1")"; out="$(realpath -m "$2")"; shift 2
nprocs=("${@:-1}")
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
here="$(realpath "$(dirname "$0")")"
cd /tmp  # from the repository root, `python -m ktq` would import the source folder instead of the installed wheel
python3 "$here/ddp_bench.py" --work /tmp/ddp --out "$out" --nprocs "${nprocs[@]}" --samples 32 --seq 512 \
  --timeout 400 2>&1 | tail -8
