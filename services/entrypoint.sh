#!/usr/bin/env bash
# Entrypoint of the tomtransfer image: one image, a command per service.
#
#   docker run IMAGE serve        # tomtransfer serve    --config $TOMTRANSFER_CONFIG
#   docker run IMAGE generate     # tomtransfer generate --config $TOMTRANSFER_CONFIG
#   docker run IMAGE train        # tomtransfer train    --config $TOMTRANSFER_CONFIG
#   docker run IMAGE evaluate     # tomtransfer evaluate --config $TOMTRANSFER_CONFIG
#   docker run IMAGE sweep        # tomtransfer sweep    --config $TOMTRANSFER_SWEEP_CONFIG
#   docker run IMAGE mlflow ...   # mlflow server ...
#   docker run IMAGE CMD ...      # any other command, unchanged (e.g. `tomtransfer report --run-id X`)
#
# A --config given after the service name wins over the default. Ray pods started by KubeRay
# override the entrypoint with their own `ray start` command and never come through here.
set -euo pipefail

config="${TOMTRANSFER_CONFIG:-/etc/tomtransfer/experiment.yaml}"
sweep_config="${TOMTRANSFER_SWEEP_CONFIG:-/etc/tomtransfer/sweep.yaml}"

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

# run SUBCOMMAND DEFAULT_CONFIG ARGS...: add --config unless the caller passed one.
run() {
  local sub="$1" default="$2"
  shift 2
  local arg
  for arg in "$@"; do
    case "${arg}" in
      --config|--config=*) exec tomtransfer "${sub}" "$@" ;;
    esac
  done
  exec tomtransfer "${sub}" --config "${default}" "$@"
}

service="${1:-}"
[[ $# -gt 0 ]] && shift
case "${service}" in
  serve|teacher)       run serve "${config}" "$@" ;;
  generate)            run generate "${config}" "$@" ;;
  train|trainer)       run train "${config}" "$@" ;;
  evaluate|evaluator)  run evaluate "${config}" "$@" ;;
  sweep)               run sweep "${sweep_config}" "$@" ;;
  mlflow)              exec mlflow server "$@" ;;
  ""|-h|--help|help)   usage ;;
  *)                   exec "${service}" "$@" ;;
esac
