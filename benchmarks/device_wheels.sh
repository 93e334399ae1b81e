#!/usr/bin/env bash
# Build the wheel folder that `ktq gpu` needs on the device machine (Python 3.12, x86-64, no network there).
# Its image has torch, transformers, accelerate, safetensors, tokenizers, pyarrow, pandas, typer, rich, psutil,
# numba and xxhash; the rest of llm-compressor's import chain is fetched here, each with --no-deps, pinned to the
# versions this repository is tested with (constraints.txt and the local venv). ktq itself goes in as a wheel.
#   usage: benchmarks/device_wheels.sh [OUT_DIR]      (default: .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
mkdir -p "$out"
rm -f "$out"/*.whl
wheels=(
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0
  loguru==0.7.3 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  dill==0.4.1 multiprocess==0.70.19
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$out" "${wheels[@]}"
# the venv has setuptools with bdist_wheel (the system pip may lack the wheel package)
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$out" .
ls -la "$out"
