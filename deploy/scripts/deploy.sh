#!/usr/bin/env bash
# Deploy, validate or remove the tomtransfer Helm release. Called by deploy/deploy.mk:
#
#   deploy.sh deploy     helm upgrade --install into the current kube context
#   deploy.sh dry-run    render exactly what `deploy` would apply and validate it offline
#   deploy.sh undeploy   helm uninstall (the data and MLflow volumes are kept)
#   deploy.sh pipeline   run the stages (default: generate train evaluate) one after another
#
# Settings (environment): NAMESPACE (tomtransfer), RELEASE (tomtransfer), IMAGE (repo[:tag|@digest]),
# VALUES (space-separated values files), JOBS (comma-separated stages to submit), RUN_ID,
# STAGES (pipeline order), TIMEOUT (10m), WAIT (1: wait for MLflow and the RayService),
# HELM_ARGS (extra helm arguments), PYTHON, KUBECTL, DRY_RUN_OUT (rendered manifests file),
# SERVE_IMPORT (1: the dry run also imports and builds the serving app, which needs ray).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
chart="${repo}/deploy/helm/tomtransfer"

NAMESPACE="${NAMESPACE:-tomtransfer}"
RELEASE="${RELEASE:-tomtransfer}"
IMAGE="${IMAGE:-}"
VALUES="${VALUES:-}"
JOBS="${JOBS:-}"
RUN_ID="${RUN_ID:-}"
STAGES="${STAGES:-generate train evaluate}"
TIMEOUT="${TIMEOUT:-10m}"
WAIT="${WAIT:-1}"
HELM_ARGS="${HELM_ARGS:-}"
KUBECTL="${KUBECTL:-kubectl}"
DRY_RUN_OUT="${DRY_RUN_OUT:-${repo}/build/deploy/${RELEASE}.yaml}"
SERVE_IMPORT="${SERVE_IMPORT:-1}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${repo}/.venv/bin/python" ]]; then PYTHON="${repo}/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON

die() { echo "deploy: $*" >&2; exit 1; }
say() { echo "deploy: $*" >&2; }

HELM="$("${here}/get-helm.sh")"

# ---- the values arguments shared by deploy and dry-run ----------------------------------------
value_args=()
for f in ${VALUES}; do
  [[ -f "${f}" ]] || die "values file not found: ${f}"
  value_args+=(-f "${f}")
done
if [[ -n "${IMAGE}" ]]; then
  if [[ "${IMAGE}" == *@* ]]; then
    value_args+=(--set-string "image.repository=${IMAGE%@*}" --set-string "image.digest=${IMAGE#*@}")
  elif [[ "${IMAGE##*/}" == *:* ]]; then
    value_args+=(--set-string "image.repository=${IMAGE%:*}" --set-string "image.tag=${IMAGE##*:}")
  else
    value_args+=(--set-string "image.repository=${IMAGE}")
  fi
fi
# rayVersion = the ray pinned in constraints.txt (the version installed in the image).
if [[ -f "${repo}/constraints.txt" ]]; then
  ray_version="$(sed -n -E 's/^ray(\[[^]]*\])?[[:space:]]*==[[:space:]]*([^[:space:];#]+).*/\2/p' "${repo}/constraints.txt" | head -n1)"
  [[ -n "${ray_version}" ]] && value_args+=(--set-string "ray.version=${ray_version}")
fi
[[ -n "${RUN_ID}" ]] && value_args+=(--set-string "jobs.runId=${RUN_ID}")
check_stages() {
  local stage
  for stage in ${1//,/ }; do
    case "${stage}" in
      generate|train|evaluate|sweep) ;;
      *) die "unknown stage '${stage}' (generate, train, evaluate, sweep)" ;;
    esac
  done
}
jobs_args() {
  local stage
  for stage in ${1//,/ }; do
    printf '%s\n' --set "jobs.${stage}.enabled=true"
  done
}
check_stages "${JOBS}"
check_stages "${STAGES}"
mapfile -t job_args < <(jobs_args "${JOBS}")
# shellcheck disable=SC2206
extra_args=(${HELM_ARGS})

helm_common=("${RELEASE}" "${chart}" --namespace "${NAMESPACE}")

preflight() {
  command -v "${KUBECTL}" >/dev/null 2>&1 || die "kubectl not found (set KUBECTL=...)"
  local ctx
  ctx="$("${KUBECTL}" config current-context 2>/dev/null)" || die "no current kube context (kubectl config use-context ...)"
  say "kube context: ${ctx}, namespace: ${NAMESPACE}, release: ${RELEASE}"
  local crd
  for crd in rayservices.ray.io rayjobs.ray.io rayclusters.ray.io; do
    "${KUBECTL}" get crd "${crd}" >/dev/null 2>&1 \
      || die "CRD ${crd} is missing: install the KubeRay operator first (deploy/README.md, 'KubeRay operator')"
  done
}

rollback_flag() {
  # Helm 4 renamed --atomic to --rollback-on-failure.
  case "$("${HELM}" version --template '{{.Version}}')" in
    v3.*) echo --atomic ;;
    *) echo --rollback-on-failure ;;
  esac
}

helm_upgrade() {
  # No --wait/--atomic while RayJobs run (a job outlives any timeout and a rollback would delete
  # it); readiness is awaited below instead.
  "${HELM}" upgrade --install "${helm_common[@]}" --create-namespace --timeout "${TIMEOUT}" \
    "${value_args[@]}" "$@" "${extra_args[@]}"
}

fullname() {
  # The name prefix the chart computes (for kubectl waits).
  "${HELM}" template "${helm_common[@]}" "${value_args[@]}" "${extra_args[@]}" \
    --show-only templates/configmap-experiment.yaml \
    | sed -n -E 's/^  name: (.*)-experiment$/\1/p' | head -n1
}

wait_ready() {
  [[ "${WAIT}" == 1 ]] || return 0
  local name
  name="$(fullname)"
  if "${KUBECTL}" -n "${NAMESPACE}" get deployment "${name}-mlflow" >/dev/null 2>&1; then
    say "waiting for MLflow"
    "${KUBECTL}" -n "${NAMESPACE}" rollout status "deployment/${name}-mlflow" --timeout "${TIMEOUT}"
  fi
  if "${KUBECTL}" -n "${NAMESPACE}" get rayservice "${name}" >/dev/null 2>&1; then
    say "waiting for RayService ${name} (Ray cluster up, models loaded)"
    "${KUBECTL}" -n "${NAMESPACE}" wait "rayservice/${name}" --for=condition=Ready --timeout "${TIMEOUT}"
  fi
}

wait_job() {
  # wait_job STAGE RUN_ID: until the RayJob completes; fails when it fails.
  local stage="$1" run_id="$2" status deadline
  local selector="app.kubernetes.io/instance=${RELEASE},tomtransfer.io/stage=${stage},tomtransfer.io/run-id=${run_id}"
  deadline=$(( $(date +%s) + ${JOB_TIMEOUT_S:-172800} ))
  say "waiting for the ${stage} RayJob (run ${run_id})"
  while :; do
    status="$("${KUBECTL}" -n "${NAMESPACE}" get rayjob -l "${selector}" \
      -o jsonpath='{.items[0].status.jobDeploymentStatus} {.items[0].status.jobStatus}' 2>/dev/null || true)"
    case "${status}" in
      "Complete SUCCEEDED") say "${stage}: succeeded"; return 0 ;;
      Failed*|*FAILED|*STOPPED|"Complete "*) die "${stage}: ${status} (kubectl -n ${NAMESPACE} describe rayjob -l ${selector})" ;;
    esac
    (( $(date +%s) < deadline )) || die "${stage}: still '${status}' after ${JOB_TIMEOUT_S:-172800}s"
    sleep 15
  done
}

case "${1:-}" in
  deploy)
    preflight
    helm_upgrade "${job_args[@]}"
    wait_ready
    ;;
  dry-run)
    say "linting the chart with these values"
    "${HELM}" lint --strict "${chart}" "${value_args[@]}" "${job_args[@]}" "${extra_args[@]}"
    mkdir -p "$(dirname "${DRY_RUN_OUT}")"
    "${HELM}" template "${helm_common[@]}" "${value_args[@]}" "${job_args[@]}" "${extra_args[@]}" \
      --kube-version 1.29.0 > "${DRY_RUN_OUT}"
    say "rendered ${DRY_RUN_OUT}; validating offline"
    check_args=()
    [[ "${SERVE_IMPORT}" == 1 ]] && check_args+=(--serve-import)
    "${PYTHON}" "${here}/chartcheck.py" check-file "${DRY_RUN_OUT}" "${check_args[@]}"
    ;;
  undeploy)
    "${HELM}" uninstall "${RELEASE}" --namespace "${NAMESPACE}" --wait --timeout "${TIMEOUT}"
    say "kept (helm.sh/resource-policy: keep): the data and MLflow volumes; delete them with"
    say "  ${KUBECTL} -n ${NAMESPACE} delete pvc -l app.kubernetes.io/instance=${RELEASE}"
    ;;
  pipeline)
    preflight
    [[ -n "${RUN_ID}" ]] || die "pipeline needs RUN_ID (a new one for every run, e.g. RUN_ID=r2)"
    enabled=()
    helm_upgrade "${job_args[@]}"
    wait_ready
    for stage in ${STAGES}; do
      enabled+=("${stage}")
      mapfile -t stage_args < <(jobs_args "$(IFS=,; echo "${enabled[*]}")")
      say "submitting ${stage}"
      helm_upgrade "${job_args[@]}" "${stage_args[@]}"
      wait_job "${stage}" "${RUN_ID}"
    done
    say "pipeline ${RUN_ID} done: ${STAGES}"
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
