# Everything a fresh clone needs: `make demo` and `make test` each build the virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned through the constraints file: an unpinned resolve downloads GBs of CUDA wheels.
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/pip
DEMO   := build/demo

.PHONY: venv demo test clean kt-kernel

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[gpu,test]'
	$(BIN)/python -c "import ktq.kernels, torch, llmcompressor" 
	touch $@

# kt-kernel 0.7.2, the CPU kernel that serves ktq's output, for tests/test_kt_kernel.py (its forward run on our files).
# Installed apart, in build/kt-kernel, never in the venv: its wheel pins torch 2.9.1 (hence --no-deps, beside our
# torch 2.13) and ships top-level packages (deep_gemm, flash_attn_origin, mscclpp, sgl_kernel, triton_kernels ...)
# that transformers would probe if they sat in the venv. The tests import it only in a subprocess, with
# PYTHONPATH=build/kt-kernel. gguf is the one import of its loader the venv lacks (numpy, safetensors, pyyaml and tqdm
# come from the venv); pinned, like kt-kernel, so the run is the same everywhere.
KT_KERNEL := build/kt-kernel

kt-kernel: $(KT_KERNEL)/.installed

$(KT_KERNEL)/.installed: $(VENV)/.installed
	rm -rf $(KT_KERNEL)
	$(PIP) install -q --no-deps --target $(KT_KERNEL) kt-kernel==0.7.2 gguf==0.17.1
	PYTHONPATH=$(KT_KERNEL) $(BIN)/python -c "import kt_kernel"
	touch $@

demo: venv
	rm -rf $(DEMO)
	$(BIN)/ktq sample $(DEMO)/source --arch qwen3_moe --layers 3 --experts 8 --hidden 512 --moe-intermediate 256 --dense-layers 1
	$(BIN)/ktq cpu -i $(DEMO)/source -o $(DEMO)/cpu-int4 --quant-method int4 --threadpool-count 2
	$(BIN)/ktq inspect $(DEMO)/cpu-int4

test: venv kt-kernel
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build
