# `make run` and `make test` bootstrap .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
PRESET ?= default

.PHONY: run test test-all bench venv clean

# `make run` installs what k2lab needs; the test and parity extras (transformers, the Agents SDK, inspect-ai, ...)
# come with the first `make test` (about a minute of a fresh `make run` saved).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Install the CPU torch first so a looser requirement never pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(PY) -m k2lab.cli demo --run-dir $(RUN_DIR) --preset $(PRESET)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" -q

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) bench/model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
