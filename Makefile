# Forge: `make run` and `make test` set everything up themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build that lies on this machine's disk. A GPU user picks the CUDA build instead, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# llama.cpp, which llama-cpp-python compiles on install: on an x86-64 CPU with AVX2, built for AVX2 rather than
# "-march=native". Some virtual machines report AMX but fault on its first tile instruction (SIGILL in ggml's AMX
# matmul on q8_0 models, seen on this project's 2-core machines in 2026-12), which a native build uses. Elsewhere
# (ARM, macOS) llama.cpp's own default. Built without pip's wheel cache, which would hand back an earlier build.
LLAMA_CMAKE_ARGS ?= $(if $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo y),\
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	CMAKE_ARGS="$(strip $(LLAMA_CMAKE_ARGS))" $(PY) -m pip install -q --no-cache-dir "llama-cpp-python>=0.3.7"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: install
	$(VENV)/bin/forge run --to ollama

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

# GPU only: Forge's patched path vs HF+PEFT on SmolLM2-135M's shape, 50 steps (loss curves and tokens/s)
bench: install
	$(PY) bench/loss_curves.py

clean:
	rm -rf runs
