#!/usr/bin/env bash
# Build the tomtransfer image with podman (services/Dockerfile); `make image` calls it.
#   deploy/scripts/build-image.sh cpu|gpu TAG
# Env: BASE (cpu base: "" = python:3.11-slim-bookworm if a registry answers, else a Debian bookworm
# base made offline by make-base.sh; "debootstrap" forces that; any other value is an image name),
# CACHE (host cache folder, default ~/.cache/tomtransfer), BUILD_ARGS (extra podman build flags).
# docker format: OCI images drop SHELL (the RUN steps need bash). Layers are cached by podman; pip's cache lives under
# $CACHE/pip and the offline base under $CACHE/images, so a rebuild is fast and a fresh machine that keeps the cache
# downloads nothing twice.
set -euo pipefail
flavor="${1:-}"
tag="${2:-}"
case "${flavor}" in cpu|gpu) ;; *) echo "build-image.sh: flavor must be cpu or gpu, got '${flavor}'" >&2; exit 2 ;; esac
[ -n "${tag}" ] || { echo "build-image.sh: usage: build-image.sh cpu|gpu TAG" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
cache="${CACHE:-${HOME}/.cache/tomtransfer}"
offline_base="localhost/tomtransfer-base:bookworm"

# podman, buildah, runc and debootstrap from Debian where we may (root + apt; the lock timeout: .ci/run builds the
# image beside `make install-test`, whose apt-get may hold the lock).
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq podman buildah runc debootstrap >/dev/null
  fi
  command -v podman >/dev/null || { echo "build-image.sh: podman is not installed (apt-get install podman buildah runc)" >&2; exit 2; }
fi
podman=(podman)
# runc works where crun's cgroup handling does not (nested containers, this CI's machines).
command -v runc >/dev/null && podman+=(--runtime runc)

ray_version="$(sed -n -E 's/^ray==([^[:space:];#]+).*/\1/p' "${repo}/constraints.txt")"
[ -n "${ray_version}" ] || { echo "build-image.sh: constraints.txt pins no ray version" >&2; exit 2; }
version="$(sed -n -E 's/^version[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' "${repo}/pyproject.toml" | head -n1)"

# can_pull IMAGE: already local, or pulled within a minute (no registry: fails fast or times out).
can_pull() { "${podman[@]}" image exists "$1" || timeout 60 "${podman[@]}" pull -q "$1" >/dev/null 2>&1; }

args=(--network host --layers --format docker -f "${repo}/services/Dockerfile" -t "${tag}"
      --build-arg "FLAVOR=${flavor}" --build-arg "RAY_VERSION=${ray_version}"
      --build-arg "VERSION=${version:-0.1.0}")
if [ "${flavor}" = cpu ]; then
  base="${BASE:-}"
  if [ -z "${base}" ] && ! can_pull docker.io/library/python:3.11-slim-bookworm; then
    echo "build-image.sh: no registry answers; using the offline Debian base (${offline_base})" >&2
    base=debootstrap
  fi
  if [ "${base}" = debootstrap ]; then
    # The offline base is made once and kept as a tarball under the cache, so a fresh machine (empty podman
    # storage, the cache kept) loads it in seconds instead of running debootstrap again (about 2 minutes).
    base_tar="${cache}/images/tomtransfer-base-bookworm.tar"
    if ! "${podman[@]}" image exists "${offline_base}"; then
      if [ -f "${base_tar}" ] && "${podman[@]}" load -q -i "${base_tar}" >/dev/null 2>&1 \
         && "${podman[@]}" image exists "${offline_base}"; then
        echo "build-image.sh: offline base loaded from ${base_tar}" >&2
      else
        bash "${here}/make-base.sh" "${offline_base}" >/dev/null
        mkdir -p "${cache}/images"
        "${podman[@]}" save -q -o "${base_tar}.tmp" "${offline_base}" && mv "${base_tar}.tmp" "${base_tar}" \
          || rm -f "${base_tar}.tmp"
      fi
    fi
    base="${offline_base}"
  fi
  [ -n "${base}" ] && args+=(--build-arg "BASE=${base}")
  # The pinned CPU torch wheel where the host's pip finds it locally (find-links), as `make install`.
  links="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
  torch_pin="$(sed -n -E 's/^torch==([^[:space:];#]+).*/\1/p' "${repo}/constraints.txt")"
  for dir in ${links}; do
    dir="${dir#file://}"
    if compgen -G "${dir}/torch-${torch_pin}+cpu-*.whl" >/dev/null || compgen -G "${dir}/torch-${torch_pin}-*.whl" >/dev/null; then
      args+=(-v "${dir}:/var/cache/tomtransfer-wheels:ro" --build-arg TORCH_FIND_LINKS=/var/cache/tomtransfer-wheels)
      break
    fi
  done
else
  cuda="$(sed -n -E 's/^ARG CUDA_IMAGE=(.*)/\1/p' "${repo}/services/Dockerfile")"
  if ! can_pull "docker.io/${cuda}" || ! can_pull "$(sed -n -E 's/^ARG UV_IMAGE=(.*)/\1/p' "${repo}/services/Dockerfile")"; then
    echo "build-image.sh: the gpu image needs its CUDA base (${cuda}) and uv from a registry; none answers" >&2
    exit 3
  fi
fi

mkdir -p "${cache}/pip"
args+=(-v "${cache}/pip:/var/cache/tomtransfer-pip" --build-arg PIP_CACHE_DIR=/var/cache/tomtransfer-pip)
# The host's CA bundle (egress through a TLS-inspecting proxy): used by pip during the build only.
ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "${ca}" ]; then
  args+=(-v "${ca}:/var/cache/tomtransfer-ca.pem:ro" --build-arg PIP_CERT=/var/cache/tomtransfer-ca.pem)
fi
# shellcheck disable=SC2086
exec "${podman[@]}" build "${args[@]}" ${BUILD_ARGS:-} "${repo}"
