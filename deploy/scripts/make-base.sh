#!/usr/bin/env bash
# Make a Debian bookworm base image without a container registry:
#   deploy/scripts/make-base.sh NAME [MIRROR]
# debootstrap (minbase) into a temporary folder, then `podman import` it as NAME. bookworm's python3
# is 3.11, the version the project pins; python3-venv and CA certificates are included so the
# Dockerfile's cpu stage can use it as BASE. Needs root (debootstrap chroots). About 2 minutes.
set -euo pipefail
name="${1:?usage: make-base.sh NAME [MIRROR]}"
mirror="${2:-http://deb.debian.org/debian}"
[ "$(id -u)" = 0 ] || { echo "make-base.sh: debootstrap needs root" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "make-base.sh: debootstrap not installed" >&2; exit 2; }
dir="$(mktemp -d /var/tmp/tomtransfer-base.XXXXXX)"
trap 'rm -rf "${dir}"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "${dir}" "${mirror}" >/dev/null
# the sources list apt uses inside the image, and no package lists or caches in the layer
echo "deb ${mirror} bookworm main" > "${dir}/etc/apt/sources.list"
rm -rf "${dir}"/var/lib/apt/lists/* "${dir}"/var/cache/apt/archives/*.deb
tar -C "${dir}" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "${name}" >/dev/null
echo "${name}"
