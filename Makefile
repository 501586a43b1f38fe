# Two commands do all set-up: `make demo` (the whole job on the built-in toy model, offline, CPU) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-extended test-fast toy-world clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from the local wheel cache / index; GPU users may install their own torch first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m unlearn.train experiment=toy_cdc_cpg run_name=demo

# One pytest worker per core, one torch thread each (tests/conftest.py): ~1.35x the throughput of one
# two-thread process on 2 cores. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Also the end-to-end runs that repeat a method on another concept or loss (tests marked `extended`).
test-extended: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --extended

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

toy-world: $(STAMP)
	$(BIN)/python -m unlearn.toy.build

clean:
	rm -rf outputs multirun .pytest_cache
