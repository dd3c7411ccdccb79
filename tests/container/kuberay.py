"""What the KubeRay operator (v1.7) adds to the pods of a RayCluster, ported from its Go source.

Read from ray-project/kuberay, ray-operator/controllers/ray/common/pod.go and job.go, utils/constant.go:
the `ray start` command (setMissingRayStartParams, generateRayStartCommand, convertParamMap, BuildPod),
the environment setContainerEnvVars adds, the liveness/readiness probes initLivenessAndReadinessProbe
injects, the worker's wait-gcs-ready init container, and the K8sJobMode submitter's command
(BuildJobSubmitCommand). Only what the container test executes is ported; names follow the Go code.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal

DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_METRICS_PORT = 8080
DEFAULT_AGENT_PORT = 52365
DEFAULT_SERVING_PORT = 8000
# utils.BaseWgetHealthCommand (KubeRay >= 1.2; the timeout is the first argument).
WGET_HEALTH = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"
READINESS_TIMEOUT_S = 2           # DefaultReadinessProbeTimeoutSeconds
READINESS_FAILURE_THRESHOLD = 10  # DefaultReadinessProbeFailureThreshold
READINESS_INITIAL_DELAY_S = 10    # DefaultReadinessProbeInitialDelaySeconds
READINESS_PERIOD_S = 5            # DefaultReadinessProbePeriodSeconds
# How long a ready node's probe may keep failing before the kubelet marks the pod unready.
PROBE_BUDGET_S = READINESS_FAILURE_THRESHOLD * READINESS_PERIOD_S
# With rayVersion >= 2.53 KubeRay 1.7 probes Ray's unified health endpoint with an httpGet on the dashboard
# agent's port instead (supportsUnifiedHealthCheck); the path is the agent's route in Ray's healthz_agent.py.
UNIFIED_HEALTH_MIN_RAY = (2, 53, 0)
UNIFIED_HEALTH_PATH = "/api/healthz"
# The container command of Ray head/worker and init containers (utils.GetContainerCommand).
RAY_CONTAINER_COMMAND = ["/bin/bash", "-lc", "--"]
SUBMITTER_COMMAND = ["/bin/bash", "-ce", "--"]

_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity(text: str | int) -> Decimal:
    """A Kubernetes resource quantity ("500m", "4Gi", "2") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text).strip())
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return Decimal(m.group(1)) * Decimal(_SUFFIXES[m.group(2)])


def quantity_value(text: str | int) -> int:
    """resource.Quantity.Value(): rounded up to an integer ("500m" -> 1, "4Gi" -> 4294967296)."""
    return math.ceil(quantity(text))


def head_service(cluster: str, namespace: str) -> str:
    """The head Service's FQDN (fqdnRayIP): what workers and submitters connect to."""
    return f"{cluster}-head-svc.{namespace}.svc.cluster.local"


def complete_start_params(params: dict, node_type: str, head_fqdn: str = "", head_port: int = DEFAULT_GCS_PORT) -> dict:
    """setMissingRayStartParams."""
    out = {str(k): str(v) for k, v in (params or {}).items()}
    if node_type == "worker":
        out.setdefault("address", f"{head_fqdn}:{head_port}")
    else:
        out.setdefault("dashboard-host", "0.0.0.0")
    out.setdefault("metrics-export-port", str(DEFAULT_METRICS_PORT))
    out["block"] = "true"
    out.setdefault("dashboard-agent-listen-port", str(DEFAULT_AGENT_PORT))
    return out


def convert_param_map(params: dict) -> str:
    """convertParamMap: sorted flags, bare `--flag` for true, omitted for false (but log-color/include-dashboard)."""
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            if value.lower() == "true":
                flags += f" --{key} "
        else:
            flags += f" --{key}={value} "
    return flags


def ray_start_command(node_type: str, params: dict, resources: dict) -> str:
    """generateRayStartCommand: num-cpus and memory from the container's limits (cpu: else its request)."""
    params = dict(params)
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu and quantity_value(cpu):
            params["num-cpus"] = str(quantity_value(cpu))
    if "memory" not in params and limits.get("memory") and quantity_value(limits["memory"]):
        params["memory"] = str(quantity_value(limits["memory"]))
    if "num-gpus" not in params:
        for key in sorted(limits):
            if key.endswith("gpu") and quantity_value(limits[key]):
                params["num-gpus"] = str(quantity_value(limits[key]))
    head = "--head " if node_type == "head" else ""
    return f"ray start {head}{convert_param_map(params)}"


def container_args(start_cmd: str) -> list[str]:
    """BuildPod: the container's args when the template has no `ray start` command of its own."""
    return [f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start_cmd}"]


def container_env(node_type: str, *, cluster: str, pod: str, group: str, head_fqdn: str, start_cmd: str,
                  service: bool, head_port: int = DEFAULT_GCS_PORT) -> dict[str, str]:
    """setContainerEnvVars (fieldRefs resolved to the pod's name and labels)."""
    env = {}
    ip = "127.0.0.1"
    if node_type == "worker":
        ip = head_fqdn
        env.update(FQ_RAY_IP=head_fqdn, RAY_IP=head_fqdn.split(".")[0])
    env.update(RAY_CLUSTER_NAME=cluster, RAY_CLOUD_INSTANCE_ID=pod, RAY_NODE_TYPE_NAME=group,
               KUBERAY_GEN_RAY_START_CMD=start_cmd, RAY_PORT=str(head_port))
    if service:
        env.update(RAY_timeout_ms_task_wait_for_death_info="0", RAY_gcs_server_request_timeout_seconds="5",
                   RAY_SERVE_KV_TIMEOUT_S="5")
    env.update(RAY_ADDRESS=f"{ip}:{head_port}", RAY_USAGE_STATS_KUBERAY_IN_USE="1",
               RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE="1")
    return env


def container_probes(container: dict, node_type: str, params: dict, *, service: bool,
                     serve_port: int = DEFAULT_SERVING_PORT) -> dict:
    """The Ray container's {"liveness": probe, "readiness": probe}: its own when the template sets one
    (KubeRay then injects nothing for that kind), else the exec probe initLivenessAndReadinessProbe injects."""
    injected = probe_commands(node_type, params, service=service, serve_port=serve_port)
    return {kind: container.get(f"{kind}Probe") or {"exec": {"command": injected[kind]}}
            for kind in ("liveness", "readiness")}


def probe_commands(node_type: str, params: dict, *, service: bool, serve_port: int = DEFAULT_SERVING_PORT) -> dict:
    """initLivenessAndReadinessProbe's exec probes: {"liveness": argv, "readiness": argv}.

    These are the probes of every Ray container when rayVersion is unset or below 2.53, and the readiness
    probe of every RayService worker whatever the version (it adds Serve's proxy health check).
    """
    agent = int(params.get("dashboard-agent-listen-port", DEFAULT_AGENT_PORT))
    dashboard = int(params.get("dashboard-port", DEFAULT_DASHBOARD_PORT))
    raylet = WGET_HEALTH.format(timeout=READINESS_TIMEOUT_S, port=agent, path="api/local_raylet_healthz")
    gcs = WGET_HEALTH.format(timeout=READINESS_FAILURE_THRESHOLD, port=dashboard, path="api/gcs_healthz")
    checks = [raylet, gcs] if node_type == "head" else [raylet]
    readiness = list(checks)
    if service and node_type == "worker":
        readiness.append(WGET_HEALTH.format(timeout=READINESS_INITIAL_DELAY_S, port=serve_port, path="-/healthz"))
    return {"liveness": ["bash", "-c", " && ".join(checks)], "readiness": ["bash", "-c", " && ".join(readiness)]}


def supports_unified_health_check(ray_version: str) -> bool:
    """supportsUnifiedHealthCheck: rayVersion parses and is at least 2.53.0."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", ray_version or "")
    return bool(m) and tuple(map(int, m.groups())) >= UNIFIED_HEALTH_MIN_RAY


def wait_gcs_ready_args(head_fqdn: str, head_port: int = DEFAULT_GCS_PORT) -> list[str]:
    """The worker's injected init container `wait-gcs-ready` (its args; command RAY_CONTAINER_COMMAND)."""
    return [f"""
        SECONDS=0
        while true; do
            if (( SECONDS <= 120 )); then
                if ray health-check --address {head_fqdn}:{head_port} > /dev/null 2>&1; then
                    echo "GCS is ready."
                    break
                fi
                echo "$SECONDS seconds elapsed: Waiting for GCS to be ready."
            else
                if ray health-check --address {head_fqdn}:{head_port}; then
                    echo "GCS is ready. Any error messages above can be safely ignored."
                    break
                fi
                echo "$SECONDS seconds elapsed: Still waiting for GCS to be ready."
            fi
            sleep 5
        done
    """]


def submitter_args(rayjob_spec: dict, dashboard_address: str, job_id: str) -> list[str]:
    """BuildJobSubmitCommand (K8sJobMode), joined with spaces as the submitter container's single arg.

    The wait loop uses KubeRay 1.4-1.6's wget health command (1.7 runs the same check with python).
    """
    address = dashboard_address if dashboard_address.startswith("http://") else f"http://{dashboard_address}"
    health = f"wget --tries 1 -T {READINESS_FAILURE_THRESHOLD} -q -O- {address}/api/gcs_healthz | grep success"
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
           json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";", "sleep", "2", ";",
           "done", ";", "if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";",
           "then", "ray", "job", "submit", "--address", address, "--no-wait"]
    if rayjob_spec.get("runtimeEnvYAML"):
        import yaml

        cmd += ["--runtime-env-json", json.dumps(json.dumps(yaml.safe_load(rayjob_spec["runtimeEnvYAML"])))]
    if rayjob_spec.get("metadata"):
        cmd += ["--metadata-json", json.dumps(json.dumps(rayjob_spec["metadata"], separators=(",", ":")))]
    cmd += ["--submission-id", job_id, "--", rayjob_spec["entrypoint"].strip(), ";", "fi", ";",
            "ray", "job", "logs", "--address", address, "--follow", job_id]
    return [" ".join(cmd)]
