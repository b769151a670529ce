# Two commands do all set-up: `make demo` (main job: lmlab and what it needs to run, nothing more) and
# `make test` (adds the dev extras: pytest, transformers, lm_eval, ... for the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-fast venv venv-dev clean

# torch first, pinned; every later install is held to the same torch by the constraints file
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(DEV_STAMP)

venv: $(STAMP)

venv-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmlab demo

test: $(DEV_STAMP)
	$(PY) -m pytest -q --durations=25 tests

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV)
