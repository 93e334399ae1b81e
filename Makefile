# Everything a fresh clone needs: `make demo` and `make test` each build the virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned through the constraints file: an unpinned resolve downloads GBs of CUDA wheels.
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1 $(BIN)/pip
DEMO   := build/demo

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[gpu,test]'
	$(BIN)/python -c "import ktq.kernels, torch, llmcompressor" 
	touch $@

demo: venv
	rm -rf $(DEMO)
	$(BIN)/ktq sample $(DEMO)/source --arch qwen3_moe --layers 3 --experts 8 --hidden 512 --moe-intermediate 256 --dense-layers 1
	$(BIN)/ktq cpu -i $(DEMO)/source -o $(DEMO)/cpu-int4 --quant-method int4 --threadpool-count 2
	$(BIN)/ktq inspect $(DEMO)/cpu-int4

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build
