# Kubernetes deployment targets of tomtransfer; the top-level Makefile does `include deploy/deploy.mk`.
#
#   make helm                                   obtain helm (PATH, else ~/.cache/tomtransfer/bin/helm)
#   make deploy IMAGE=repo:tag [VALUES=file]    preflight, helm upgrade --install, wait for the new cluster
#   make deploy DRY_RUN=1                       render the same release and validate it offline
#   make deploy-dry-run                         the same as DRY_RUN=1
#   make deploy IMAGE=.. JOBS=generate [RUN_ID=r1]  also create RayJobs (outside the release)
#   make deploy-pipeline IMAGE=.. [RUN_ID=r2]   generate, then train, then evaluate, each awaited
#   make rollback [REVISION=n]                  helm rollback (default: previous revision), then wait
#   make undeploy                               helm uninstall (data and MLflow volumes are kept)
#   make deploy-check                           lint + validate the default, cpu, gpu and ci values
#   make deploy-image IMAGE=repo:tag [FLAVOR=gpu]  the image built by make image (deploy/image.mk), tagged IMAGE
#
# Variables: NAMESPACE, RELEASE, IMAGE, LIGHT_IMAGE, RAY_VERSION, VALUES (space-separated files),
# JOBS, RUN_ID, REVISION, DRY_RUN, TIMEOUT, HELM_ARGS, FLAVOR, SERVE_IMPORT, DRY_RUN_OUT.
# See deploy/README.md.

DEPLOY_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

NAMESPACE ?= tomtransfer
RELEASE ?= tomtransfer
IMAGE ?=
LIGHT_IMAGE ?=
RAY_VERSION ?=
REVISION ?=
VALUES ?=
JOBS ?=
RUN_ID ?=
DRY_RUN ?= 0
TIMEOUT ?= 10m
HELM_ARGS ?=
FLAVOR ?= cpu
# The dry run also imports and builds the serving app (needs the project installed with ray).
SERVE_IMPORT ?= 1
# Python for the offline validation: the project's virtualenv when `make install` made it.
DEPLOY_VENV := $(or $(VENV),.venv)
DEPLOY_PYTHON ?= $(if $(wildcard $(DEPLOY_VENV)/bin/python),$(DEPLOY_VENV)/bin/python,python3)

DEPLOY_ENV = NAMESPACE='$(NAMESPACE)' RELEASE='$(RELEASE)' IMAGE='$(IMAGE)' VALUES='$(VALUES)' \
	LIGHT_IMAGE='$(LIGHT_IMAGE)' RAY_VERSION='$(RAY_VERSION)' REVISION='$(REVISION)' \
	JOBS='$(JOBS)' RUN_ID='$(RUN_ID)' TIMEOUT='$(TIMEOUT)' HELM_ARGS='$(HELM_ARGS)' \
	PYTHON='$(DEPLOY_PYTHON)' SERVE_IMPORT='$(SERVE_IMPORT)' $(if $(DRY_RUN_OUT),DRY_RUN_OUT='$(DRY_RUN_OUT)')

.PHONY: helm deploy deploy-dry-run undeploy rollback deploy-pipeline deploy-check deploy-image

helm:
	@PYTHON='$(DEPLOY_PYTHON)' bash $(DEPLOY_DIR)/scripts/get-helm.sh >/dev/null

ifneq ($(filter 1 true yes,$(DRY_RUN)),)
deploy: deploy-dry-run
else
deploy: helm
	@$(DEPLOY_ENV) bash $(DEPLOY_DIR)/scripts/deploy.sh deploy
endif

deploy-dry-run: helm
	@$(DEPLOY_ENV) bash $(DEPLOY_DIR)/scripts/deploy.sh dry-run

undeploy: helm
	@$(DEPLOY_ENV) bash $(DEPLOY_DIR)/scripts/deploy.sh undeploy

rollback: helm
	@$(DEPLOY_ENV) bash $(DEPLOY_DIR)/scripts/deploy.sh rollback

deploy-pipeline: helm
	@$(DEPLOY_ENV) bash $(DEPLOY_DIR)/scripts/deploy.sh pipeline

deploy-check: helm
	@$(DEPLOY_PYTHON) $(DEPLOY_DIR)/scripts/chartcheck.py all

deploy-image:
	@test -n '$(IMAGE)' || { echo "deploy-image: set IMAGE=registry/tomtransfer:tag" >&2; exit 2; }
	$(MAKE) image-$(FLAVOR)
	podman tag '$(if $(filter gpu,$(FLAVOR)),$(IMAGE_GPU),$(IMAGE_CPU))' '$(IMAGE)'

