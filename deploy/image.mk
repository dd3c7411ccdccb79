# Images and the container test; the top-level Makefile does `-include deploy/image.mk`.
#
#   make image              the CPU image (and the GPU image where a registry serves its CUDA base)
#   make image-cpu | image-gpu
#   make test-deploy        build the CPU image, then run it the way KubeRay runs its pods
#                           (tests/container/, on a private podman network)
#
# Variables: IMAGE_REPO (default tomtransfer), BASE (cpu base: "" = python:3.11-slim-bookworm, or
# the offline Debian base when no registry answers; "debootstrap" forces it; or an image name).
# Tags follow the chart: IMAGE_REPO:<appVersion> and IMAGE_REPO:<appVersion>-gpu.

IMAGE_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
IMAGE_REPO ?= tomtransfer
IMAGE_VERSION := $(shell sed -n -E 's/^appVersion:[[:space:]]*"?([^"]+)"?/\1/p' $(IMAGE_DIR)/helm/tomtransfer/Chart.yaml)
IMAGE_CPU ?= $(IMAGE_REPO):$(IMAGE_VERSION)
IMAGE_GPU ?= $(IMAGE_REPO):$(IMAGE_VERSION)-gpu
BASE ?=
IMAGE_ENV = BASE='$(BASE)' CACHE='$(CACHE)'

.PHONY: image image-cpu image-gpu test-deploy

image: image-cpu
	@$(IMAGE_ENV) bash $(IMAGE_DIR)/scripts/build-image.sh gpu $(IMAGE_GPU); rc=$$?; \
	  if [ $$rc = 3 ]; then echo "note: gpu image not built (its CUDA base needs a registry)"; else exit $$rc; fi

image-cpu:
	@$(IMAGE_ENV) bash $(IMAGE_DIR)/scripts/build-image.sh cpu $(IMAGE_CPU)

image-gpu:
	@$(IMAGE_ENV) bash $(IMAGE_DIR)/scripts/build-image.sh gpu $(IMAGE_GPU)

# The container test needs root podman; it starts nothing outside its --internal network.
test-deploy: install-test image-cpu
	TOMTRANSFER_IMAGE='$(IMAGE_CPU)' $(BIN)/python -m pytest -p no:cacheprovider -m container tests/container $(PYTEST_ARGS)
