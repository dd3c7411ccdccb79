#!/usr/bin/env bash
# Deploy, validate, roll back or remove the tomtransfer Helm release. Called by deploy/deploy.mk:
#
#   deploy.sh deploy     preflight, helm upgrade --install, wait for the (new) cluster; JOBS: submit them
#   deploy.sh dry-run    render exactly what `deploy` would apply (and the JOBS) and validate it offline
#   deploy.sh rollback   helm rollback to REVISION (default: the previous one) and wait for the cluster
#   deploy.sh undeploy   helm uninstall (the data and MLflow volumes are kept)
#   deploy.sh pipeline   deploy, then run the STAGES (default: generate train evaluate) one after another
#
# Settings (environment): NAMESPACE (tomtransfer), RELEASE (tomtransfer), IMAGE (repo[:tag|@digest];
# required to deploy), LIGHT_IMAGE (the CPU image for MLflow/submitters/test), RAY_VERSION (default:
# the image's io.ray.version label, else the ray pin in constraints.txt), VALUES (values files),
# JOBS (comma-separated stages to submit), RUN_ID (default: from the time), STAGES, REVISION,
# TIMEOUT (10m), WAIT (1), HELM_ARGS, PYTHON, KUBECTL, DRY_RUN_OUT, SERVE_IMPORT (1).
#
# RayJobs are one-shot and not part of the Helm release: they are rendered with jobs.render=true
# and created with `kubectl create` (a run id already used is refused), so no upgrade or rollback
# of the release deletes a running job.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
chart="${repo}/deploy/helm/tomtransfer"

NAMESPACE="${NAMESPACE:-tomtransfer}"
RELEASE="${RELEASE:-tomtransfer}"
IMAGE="${IMAGE:-}"
LIGHT_IMAGE="${LIGHT_IMAGE:-}"
RAY_VERSION="${RAY_VERSION:-}"
VALUES="${VALUES:-}"
JOBS="${JOBS:-}"
RUN_ID="${RUN_ID:-}"
STAGES="${STAGES:-generate train evaluate}"
REVISION="${REVISION:-}"
TIMEOUT="${TIMEOUT:-10m}"
WAIT="${WAIT:-1}"
POLL_S="${POLL_S:-15}"
HELM_ARGS="${HELM_ARGS:-}"
KUBECTL="${KUBECTL:-kubectl}"
DRY_RUN_OUT="${DRY_RUN_OUT:-${repo}/build/deploy/${RELEASE}.yaml}"
SERVE_IMPORT="${SERVE_IMPORT:-1}"
# Oldest KubeRay the chart is made for (its probes are its own; see deploy/README.md).
MIN_KUBERAY="1.4.0"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${repo}/.venv/bin/python" ]]; then PYTHON="${repo}/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON

say() { echo "deploy: $*" >&2; }
die() { echo "deploy: $*" >&2; exit 1; }
usage_error() { echo "deploy: $*" >&2; exit 2; }

cmd="${1:-}"
case "${cmd}" in
  deploy|dry-run|rollback|undeploy|pipeline) ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

# ---- input checks: everything before anything is written ----------------------------------------
check_stages() {
  local stage
  for stage in ${1//,/ }; do
    case "${stage}" in
      generate|train|evaluate|sweep) ;;
      *) usage_error "unknown stage '${stage}' (generate, train, evaluate, sweep)" ;;
    esac
  done
}
check_stages "${JOBS}"
check_stages "${STAGES}"
for f in ${VALUES}; do [[ -f "${f}" ]] || usage_error "values file not found: ${f}"; done
if [[ -n "${RUN_ID}" && ! "${RUN_ID}" =~ ^[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?$ ]]; then
  usage_error "RUN_ID '${RUN_ID}': lower-case letters, digits and '-', at most 12 characters"
fi
if [[ -n "${REVISION}" && ! "${REVISION}" =~ ^[0-9]+$ ]]; then usage_error "REVISION '${REVISION}' is not a number"; fi
if [[ "${cmd}" == deploy || "${cmd}" == pipeline ]] && [[ -z "${IMAGE}" ]]; then
  usage_error "IMAGE is not set: make deploy IMAGE=registry.example.com/tomtransfer:TAG (build it with make image)"
fi
# A new run id for every submission (a RayJob runs once; kubectl create refuses a used name).
if [[ -z "${RUN_ID}" ]]; then RUN_ID="r$(date -u +%y%m%d%H%M)"; fi

HELM="$("${here}/get-helm.sh")"

image_args() {
  # image_args PREFIX IMAGE: --set-string PREFIX.repository/tag/digest for repo[:tag|@digest]
  local prefix="$1" ref="$2"
  if [[ "${ref}" == *@* ]]; then
    printf '%s\n' --set-string "${prefix}.repository=${ref%@*}" --set-string "${prefix}.digest=${ref#*@}"
  elif [[ "${ref##*/}" == *:* ]]; then
    printf '%s\n' --set-string "${prefix}.repository=${ref%:*}" --set-string "${prefix}.tag=${ref##*:}"
  else
    printf '%s\n' --set-string "${prefix}.repository=${ref}"
  fi
}

ray_version_of_image() {
  # The io.ray.version label of IMAGE: a local image (podman), else the registry's (skopeo).
  local v=""
  [[ -n "${IMAGE}" ]] || return 0
  if command -v podman >/dev/null 2>&1; then
    v="$(podman image inspect --format '{{ index .Labels "io.ray.version" }}' "${IMAGE}" 2>/dev/null || true)"
  fi
  if [[ -z "${v}" || "${v}" == "<no value>" ]] && command -v skopeo >/dev/null 2>&1; then
    v="$(skopeo inspect --no-tags --format '{{ index .Labels "io.ray.version" }}' "docker://${IMAGE}" 2>/dev/null || true)"
  fi
  [[ "${v}" == "<no value>" ]] && v=""
  echo "${v}"
}

if [[ -z "${RAY_VERSION}" ]]; then
  RAY_VERSION="$(ray_version_of_image)"
  if [[ -n "${RAY_VERSION}" ]]; then
    say "ray ${RAY_VERSION} (label io.ray.version of ${IMAGE})"
  else
    RAY_VERSION="$(sed -n -E 's/^ray(\[[^]]*\])?[[:space:]]*==[[:space:]]*([^[:space:];#]+).*/\2/p' "${repo}/constraints.txt" | head -n1)"
    [[ -n "${RAY_VERSION}" ]] || usage_error "no RAY_VERSION: the image has no io.ray.version label and constraints.txt no ray pin"
    say "ray ${RAY_VERSION} (constraints.txt; the image's io.ray.version label could not be read)"
  fi
fi

value_args=()
for f in ${VALUES}; do value_args+=(-f "${f}"); done
[[ -n "${IMAGE}" ]] && mapfile -t -O "${#value_args[@]}" value_args < <(image_args image "${IMAGE}")
[[ -n "${LIGHT_IMAGE}" ]] && mapfile -t -O "${#value_args[@]}" value_args < <(image_args lightImage "${LIGHT_IMAGE}")
value_args+=(--set-string "ray.version=${RAY_VERSION}")
# shellcheck disable=SC2206
extra_args=(${HELM_ARGS})
helm_common=("${RELEASE}" "${chart}" --namespace "${NAMESPACE}")

rendered=""
render_release() {
  # The release's manifests, rendered once (helm template is the slow step here).
  if [[ -z "${rendered}" ]]; then
    rendered="$("${HELM}" template "${helm_common[@]}" "${value_args[@]}" "${extra_args[@]}" --kube-version 1.29.0)" || exit 1
  fi
  printf '%s\n' "${rendered}"
}

render_jobs() {
  # render_jobs STAGES(comma-separated): the stages' RayJobs for RUN_ID (not part of the release).
  local stage args=(--set jobs.render=true --set-string "jobs.runId=${RUN_ID}")
  for stage in ${1//,/ }; do args+=(--set "jobs.${stage}.enabled=true"); done
  "${HELM}" template "${helm_common[@]}" "${value_args[@]}" "${extra_args[@]}" "${args[@]}" \
    --kube-version 1.29.0 --show-only templates/rayjobs.yaml
}

kc() { "${KUBECTL}" -n "${NAMESPACE}" "$@"; }

# ---- preflight -------------------------------------------------------------------------------------
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }

check_operator() {
  local images="" sel image version
  for sel in app.kubernetes.io/name=kuberay-operator app.kubernetes.io/component=kuberay-operator; do
    images+="$("${KUBECTL}" get deployments --all-namespaces -l "${sel}" \
      -o jsonpath='{range .items[*]}{.spec.template.spec.containers[0].image}{"\n"}{end}' 2>/dev/null || true)"
    [[ -n "${images}" ]] && break
  done
  image="$(printf '%s\n' "${images}" | sed '/^$/d' | head -n1)"
  [[ -n "${image}" ]] || die "no KubeRay operator Deployment found (labels app.kubernetes.io/name or component = kuberay-operator): install it first (deploy/README.md, 'KubeRay operator')"
  version="$(sed -n -E 's/.*:v?([0-9]+\.[0-9]+\.[0-9]+)[^:@]*$/\1/p' <<<"${image%@*}")"
  if [[ -z "${version}" ]]; then
    say "KubeRay operator ${image}: version unknown from its tag; the chart needs >= ${MIN_KUBERAY}"
  elif ! version_ge "${version}" "${MIN_KUBERAY}"; then
    die "KubeRay operator ${version} (${image}) is older than ${MIN_KUBERAY}: upgrade it"
  else
    say "KubeRay operator ${version}"
  fi
}

check_refs() {
  # Secrets the release references exist; PVCs it mounts exist or can be made with ReadWriteMany.
  local kind name class line
  while read -r kind name class; do
    case "${kind}" in
      secret)
        kc get secret "${name}" >/dev/null 2>&1 \
          || die "Secret ${name} does not exist in ${NAMESPACE}: create it first (kubectl -n ${NAMESPACE} create secret generic ${name} ...; deploy/README.md 'Secrets')" ;;
      claim)
        kc get pvc "${name}" >/dev/null 2>&1 || die "PersistentVolumeClaim ${name} (existingClaim) does not exist in ${NAMESPACE}" ;;
      rwx)
        [[ "${class}" == "-" ]] && class="$("${KUBECTL}" get storageclass -o jsonpath='{range .items[?(@.metadata.annotations.storageclass\.kubernetes\.io/is-default-class=="true")]}{.metadata.name}{"\n"}{end}' 2>/dev/null | head -n1)"
        [[ -n "${class}" ]] || die "PVC ${name} needs ReadWriteMany but the cluster has no default StorageClass: set storage.data.storageClassName"
        line="$("${KUBECTL}" get storageclass "${class}" -o jsonpath='{.provisioner}' 2>/dev/null)" \
          || die "StorageClass ${class} (for the ReadWriteMany PVC ${name}) does not exist"
        case "${line}" in
          *nfs*|*cephfs*|*efs*|*filestore*|*azurefile*|*file.csi*|*longhorn*|*juicefs*|*lustre*|*gluster*|*beegfs*|*weka*|*portworx*)
            say "StorageClass ${class} (${line}) for the ReadWriteMany PVC ${name}" ;;
          *) say "WARNING: StorageClass ${class} (${line}) may not support ReadWriteMany (PVC ${name}); pods on several nodes need it" ;;
        esac ;;
    esac
  done < <("${PYTHON}" "${here}/chartcheck.py" refs - <<<"${rendered}")
}

preflight() {
  command -v "${KUBECTL}" >/dev/null 2>&1 || die "kubectl not found (set KUBECTL=...)"
  local ctx crd
  ctx="$("${KUBECTL}" config current-context 2>/dev/null)" || die "no current kube context (kubectl config use-context ...)"
  say "kube context: ${ctx}, namespace: ${NAMESPACE}, release: ${RELEASE}"
  for crd in rayservices.ray.io rayjobs.ray.io rayclusters.ray.io; do
    "${KUBECTL}" get crd "${crd}" >/dev/null 2>&1 \
      || die "CRD ${crd} is missing: install the KubeRay operator first (deploy/README.md, 'KubeRay operator')"
  done
  check_operator
  if "${KUBECTL}" get namespace "${NAMESPACE}" >/dev/null 2>&1; then
    render_release >/dev/null
    check_refs
  else
    die "namespace ${NAMESPACE} does not exist: create it and the Secrets the release needs first (kubectl create namespace ${NAMESPACE})"
  fi
}

# ---- waiting, and what to show when it fails -------------------------------------------------------
fullname() { render_release >/dev/null; sed -n -E 's/^  name: (.*)-experiment$/\1/p' <<<"${rendered}" | head -n1; }

show_failure() {
  # show_failure WHAT: status and recent events, for a failed wait.
  say "---- $1: status ----"
  kc get rayservice,raycluster,rayjob,pods -l "app.kubernetes.io/instance=${RELEASE}" -o wide >&2 || true
  [[ -n "${2:-}" ]] && { kc describe "$2" >&2 || true; }
  say "---- recent events in ${NAMESPACE} ----"
  kc get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
}

seconds() { local t="$1"; case "${t}" in *h) echo $(( ${t%h} * 3600 ));; *m) echo $(( ${t%m} * 60 ));; *s) echo "${t%s}";; *) echo "${t}";; esac; }

wait_rayservice() {
  # Ready of the spec just applied: observedGeneration caught up, Ready true, no upgrade pending
  # (during a NewCluster upgrade Ready stays true from the old cluster until the new one takes over).
  local name="$1" generation status deadline
  generation="$(kc get rayservice "${name}" -o jsonpath='{.metadata.generation}')"
  deadline=$(( $(date +%s) + $(seconds "${TIMEOUT}") ))
  say "waiting for RayService ${name} generation ${generation} (Ray cluster up, models loaded, serve config applied)"
  while :; do
    status="$(kc get rayservice "${name}" -o jsonpath='{.status.observedGeneration}|{.status.conditions[?(@.type=="Ready")].status}|{.status.conditions[?(@.type=="UpgradeInProgress")].status}|{.status.pendingServiceStatus.rayClusterName}' 2>/dev/null || true)"
    IFS='|' read -r observed ready upgrading pending <<<"${status}"
    if [[ "${observed:-}" == "${generation}" && "${ready:-}" == True && "${upgrading:-False}" != True && -z "${pending:-}" ]]; then
      say "RayService ${name} ready (cluster $(kc get rayservice "${name}" -o jsonpath='{.status.activeServiceStatus.rayClusterName}' 2>/dev/null || true))"
      return 0
    fi
    if (( $(date +%s) >= deadline )); then
      show_failure "RayService ${name} not ready after ${TIMEOUT} (observedGeneration=${observed:-?} Ready=${ready:-?} UpgradeInProgress=${upgrading:-?} pending=${pending:--})" "rayservice/${name}"
      die "RayService ${name} did not become ready; \`make rollback\` returns to the previous revision"
    fi
    sleep "${POLL_S}"
  done
}

wait_ready() {
  [[ "${WAIT}" == 1 ]] || return 0
  local name
  name="$(fullname)"
  if kc get deployment "${name}-mlflow" >/dev/null 2>&1; then
    say "waiting for MLflow"
    kc rollout status "deployment/${name}-mlflow" --timeout "${TIMEOUT}" \
      || { show_failure "MLflow" "deployment/${name}-mlflow"; die "MLflow did not become ready"; }
  fi
  if kc get rayservice "${name}" >/dev/null 2>&1; then wait_rayservice "${name}"; fi
}

submit_jobs() {
  # submit_jobs STAGES: create the stages' RayJobs for RUN_ID; prints their names.
  local manifests name
  manifests="$(render_jobs "$1")"
  while read -r name; do
    [[ -z "${name}" ]] && continue
    if kc get rayjob "${name}" >/dev/null 2>&1; then
      echo "deploy: RayJob ${name} exists: run id ${RUN_ID} was used already; choose a new RUN_ID" >&2
      exit 2
    fi
  done < <(sed -n -E 's/^  name: (.*)$/\1/p' <<<"${manifests}")
  kc create -f - -o name <<<"${manifests}" | sed 's#^.*/##'
}

wait_job() {
  # wait_job NAME: until the RayJob finished; a failed attempt with retries left (Retrying, or a
  # FAILED job status while the deployment is still running) is not final.
  local name="$1" status last="" deadline
  deadline=$(( $(date +%s) + ${JOB_TIMEOUT_S:-172800} ))
  say "waiting for RayJob ${name}"
  while :; do
    status="$(kc get rayjob "${name}" -o jsonpath='{.status.jobDeploymentStatus} {.status.jobStatus}' 2>/dev/null || echo "?")"
    [[ "${status}" != "${last}" ]] && { say "${name}: ${status:-New}"; last="${status}"; }
    case "${status}" in
      "Complete SUCCEEDED") say "${name}: succeeded"; return 0 ;;
      Complete*|Failed*|ValidationFailed*|Suspended*)
        show_failure "RayJob ${name}: ${status}" "rayjob/${name}"
        die "${name}: ${status}" ;;
    esac
    if (( $(date +%s) >= deadline )); then
      show_failure "RayJob ${name} still '${status}'" "rayjob/${name}"
      die "${name}: still '${status}' after ${JOB_TIMEOUT_S:-172800}s"
    fi
    sleep "${POLL_S}"
  done
}

helm_upgrade() {
  # No --wait: helm cannot tell when a RayService is ready; wait_ready does.
  "${HELM}" upgrade --install "${helm_common[@]}" --timeout "${TIMEOUT}" "${value_args[@]}" "${extra_args[@]}"
}

case "${cmd}" in
  deploy)
    preflight
    helm_upgrade
    wait_ready
    if [[ -n "${JOBS}" ]]; then
      created="$(submit_jobs "${JOBS}")"
      for job in ${created}; do say "created RayJob ${job} (kubectl -n ${NAMESPACE} get rayjob ${job})"; done
    fi
    ;;
  dry-run)
    say "linting the chart with these values"
    "${HELM}" lint --strict "${chart}" "${value_args[@]}" "${extra_args[@]}"
    mkdir -p "$(dirname "${DRY_RUN_OUT}")"
    render_release > "${DRY_RUN_OUT}"
    if [[ -n "${JOBS}" ]]; then { echo "---"; render_jobs "${JOBS}"; } >> "${DRY_RUN_OUT}"; fi
    say "rendered ${DRY_RUN_OUT}; validating offline"
    check_args=()
    [[ "${SERVE_IMPORT}" == 1 ]] && check_args+=(--serve-import)
    "${PYTHON}" "${here}/chartcheck.py" check-file "${DRY_RUN_OUT}" "${check_args[@]}"
    ;;
  rollback)
    # shellcheck disable=SC2086
    "${HELM}" rollback "${RELEASE}" ${REVISION} --namespace "${NAMESPACE}" --timeout "${TIMEOUT}"
    wait_ready
    ;;
  undeploy)
    "${HELM}" uninstall "${RELEASE}" --namespace "${NAMESPACE}" --wait --timeout "${TIMEOUT}"
    say "kept (helm.sh/resource-policy: keep): the data and MLflow volumes; delete them with"
    say "  ${KUBECTL} -n ${NAMESPACE} delete pvc -l app.kubernetes.io/instance=${RELEASE}"
    say "RayJobs are not part of the release; delete them with"
    say "  ${KUBECTL} -n ${NAMESPACE} delete rayjob -l app.kubernetes.io/instance=${RELEASE}"
    ;;
  pipeline)
    preflight
    helm_upgrade
    wait_ready
    for stage in ${STAGES}; do
      say "submitting ${stage} (run ${RUN_ID})"
      created="$(submit_jobs "${stage}")"
      for job in ${created}; do wait_job "${job}"; done
    done
    say "pipeline ${RUN_ID} done: ${STAGES}"
    ;;
esac
