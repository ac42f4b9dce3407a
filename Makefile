# Forge: `make run` and `make test` set everything up themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build that lies on this machine's disk. A GPU user picks the CUDA build instead, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
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
