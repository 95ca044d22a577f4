# Two entry points, both from a clean clone with only the system Python:
#   make demo   set up .venv, then train the five stages on the embedded data (CPU, minutes)
#   make test   set up .venv, then run the test suite
# A GPU user installs a CUDA torch into .venv first; set-up keeps an importable torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmstages demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the slow tests too (every real conversation through every mask variant, ...)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) .cache runs wandb lightning_logs
