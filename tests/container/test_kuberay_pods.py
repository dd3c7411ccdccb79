"""The built CPU image, run the way KubeRay v1.7 runs its pods (`make test-deploy`).

Everything comes from the chart rendered with `helm template` (values-cpu.yaml plus tests/container/values.yaml;
the generate RayJob rendered as deploy.sh renders one-shot jobs):
securityContext, volumes, env, resources, the RayService's serveConfigV2, the RayJob's entrypoint and submitter
template, the MLflow Deployment. What the operator adds (the `ray start` command lines, its env, the probes, the
worker's wait-gcs-ready init container, the submitter's command) comes from tests/container/kuberay.py, ported
from KubeRay's source. All pods run on one `podman network create --internal` network, inside the test
session's private network namespace; Service names are network aliases.

Then, for real: the probes (the chart's own, else the exec probes KubeRay injects) pass in the head and the
worker; serveConfigV2 is PUT to the dashboard's /api/serve/applications/ as the RayService controller does, and
the openai client gets chat completions from teacher and student through the Serve port; the RayJob's
entrypoint is submitted by the submitter command KubeRay generates and runs to SUCCEEDED, logging to the MLflow
container.
"""

from __future__ import annotations

import json
import os
import secrets as secrets_module
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.container import kuberay
from tests.container.pods import Cluster, podman, run_once

pytestmark = [pytest.mark.container, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tomtransfer"
IMAGE = os.environ.get("TOMTRANSFER_IMAGE", "tomtransfer:0.1.0")
RELEASE, NAMESPACE = "t", "default"
SERVE_CLUSTER = f"{RELEASE}-tomtransfer-ab1cd"  # KubeRay: <rayservice>-<5 random characters>
READY_S = 300  # a pod's start on a busy 2-core machine
JOB_S = 600  # the tiny generate job takes about a minute


def helm() -> str:
    out = subprocess.run(["bash", str(REPO / "deploy" / "scripts" / "get-helm.sh")], capture_output=True,
                         text=True, env={**os.environ, "PYTHON": os.environ.get("PYTHON", "python3")})
    assert out.returncode == 0, f"no helm: {out.stderr}"
    return out.stdout.strip()


def service_aliases(name: str) -> tuple[str, ...]:
    return (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local")


def image_ray_version() -> str:
    """The ray version installed in the image (what KubeRay's rayVersion must say)."""
    return run_once(IMAGE, ["python", "-c", "import ray; print(ray.__version__)"]).strip()


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    assert podman("image", "exists", IMAGE, check=False).returncode == 0, f"{IMAGE} not built: make image-cpu"
    repo, _, tag = IMAGE.rpartition(":")
    common = [helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
              "-f", str(CHART / "values-cpu.yaml"), "-f", str(Path(__file__).with_name("values.yaml")),
              "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
              "--set", f"ray.version={image_ray_version()}"]
    # the release, then the generate RayJob the way deploy.sh renders one-shot jobs
    jobs = ["--set", "jobs.render=true", "--set", "jobs.generate.enabled=true", "--show-only", "templates/rayjobs.yaml"]
    docs = []
    for argv in (common, common + jobs):
        out = subprocess.run(argv, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        docs += [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def one(manifests, kind):
    found = [d for (k, _), d in manifests.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def ray_pod(cluster: Cluster, name: str, group_spec: dict, node_type: str, *, cluster_name: str, group: str,
            service: bool, aliases: tuple[str, ...] = ()) -> dict:
    """Start a Ray head or worker pod as KubeRay's BuildPod makes it; returns its ray start params."""
    template = group_spec["template"]["spec"]
    container = template["containers"][0]
    head_fqdn = kuberay.head_service(cluster_name, NAMESPACE)
    params = kuberay.complete_start_params(group_spec.get("rayStartParams") or {}, node_type, head_fqdn)
    start = kuberay.ray_start_command(node_type, params, container.get("resources") or {})
    own = " ".join(f" {c} " for c in (container.get("command") or []) + (container.get("args") or []))
    assert "ray start" not in own, "the chart's Ray containers leave the `ray start` command to KubeRay"
    args = kuberay.container_args(start)
    if own.strip():
        args = [f"{own} && {args[0]}"]
    env = kuberay.container_env(node_type, cluster=cluster_name, pod=name, group=group, head_fqdn=head_fqdn,
                                start_cmd=start, service=service)
    if node_type == "worker":  # the injected init container blocks until the head's GCS answers
        init = cluster.run(f"{name}-init", IMAGE, template, container, command=kuberay.RAY_CONTAINER_COMMAND,
                           args=kuberay.wait_gcs_ready_args(head_fqdn), extra_env={**env}, detach=False,
                           timeout=READY_S)
        assert init.returncode == 0 and "GCS is ready" in init.stdout, init.stdout[-3000:] + init.stderr[-2000:]
    cluster.run(name, IMAGE, template, container, command=kuberay.RAY_CONTAINER_COMMAND, args=args,
                extra_env=env, aliases=aliases)
    return params


def make_secrets(manifests) -> dict[str, dict[str, str]]:
    """Every Secret key the rendered pods reference and the chart does not create, with a random value
    (what `kubectl create secret generic` does before `make deploy`)."""
    text = json.dumps(list(manifests.values()))
    refs = {(r["name"], r["key"]) for r in _find(json.loads(text), "secretKeyRef")}
    created = {name for (kind, name) in manifests if kind == "Secret"}
    secrets: dict[str, dict[str, str]] = {}
    for name, key in sorted(refs):
        if name not in created:
            secrets.setdefault(name, {})[key] = secrets_module.token_hex(16)
    for (kind, name), doc in manifests.items():
        if kind == "Secret":
            secrets[name] = dict(doc.get("stringData") or {})
    return secrets


def _find(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            else:
                yield from _find(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _find(item, key)


def serve_token(cluster: Cluster, manifests) -> str | None:
    """The bearer token the serving pods get (serving.auth_token_env of the rendered experiment)."""
    experiment = yaml.safe_load(one_config(manifests)["experiment.yaml"])
    env_name = (experiment.get("serving") or {}).get("auth_token_env")
    head = one(manifests, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    for env in head["containers"][0].get("env", []):
        if env["name"] == env_name:
            return cluster.env_value(env)
    return None


def one_config(manifests) -> dict:
    found = [d["data"] for (kind, _), d in manifests.items() if kind == "ConfigMap" and "experiment.yaml" in d["data"]]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def cluster(manifests, tmp_path_factory):
    from tests.fixtures.tiny_models import tiny_model_dir

    root = tmp_path_factory.mktemp("pods")
    root.chmod(0o755)
    config_maps = {name: d["data"] for (kind, name), d in manifests.items() if kind == "ConfigMap"}
    c = Cluster(network=f"tomtransfer-ct-{os.getpid()}", root=root, config_maps=config_maps,
                secrets=make_secrets(manifests))
    c.create()
    try:
        data = c.claim_dir(f"{RELEASE}-tomtransfer-data")
        uid = one(manifests, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "securityContext"]["runAsUser"]
        for role, (arch, seed) in {"teacher": ("qwen2", 3), "student": ("llama", 4)}.items():
            target = shutil.copytree(tiny_model_dir(arch, seed=seed), data / "models" / role)
            # owned by the pods' user, as weights fetched onto the volume by a pod of the release are
            for path in [target.parent, target, *target.rglob("*")]:
                os.chown(path, uid, uid)
        yield c
    finally:
        c.teardown()


@pytest.fixture(scope="module")
def mlflow(manifests, cluster):
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    name = deployment["metadata"]["name"]
    service = manifests[("Service", name)]
    container = spec["containers"][0]
    pod = f"{name}-0"
    cluster.run(pod, IMAGE, spec, container, aliases=service_aliases(name))
    # the Deployment's own readiness probe, as the kubelet runs it, gates the Service
    ok, detail = cluster.wait_for_probe(pod, container, container["readinessProbe"], READY_S)
    assert ok, f"MLflow never became ready: {detail}\n{cluster.logs(pod)}"
    return {"pod": pod, "url": f"http://{cluster.ip(pod)}:{service['spec']['ports'][0]['port']}"}


@pytest.fixture(scope="module")
def serving(manifests, cluster, mlflow):
    rayservice = one(manifests, "RayService")
    spec = rayservice["spec"]["rayClusterConfig"]
    serve_svc = service_aliases(f"{rayservice['metadata']['name']}-serve-svc")
    head = f"{SERVE_CLUSTER}-head"
    head_params = ray_pod(cluster, head, spec["headGroupSpec"], "head", cluster_name=SERVE_CLUSTER,
                          group="headgroup", service=True,
                          aliases=(kuberay.head_service(SERVE_CLUSTER, NAMESPACE), *serve_svc))
    workers = []
    for group in spec.get("workerGroupSpecs", []):
        for i in range(group["replicas"]):
            name = f"{SERVE_CLUSTER}-{group['groupName']}-worker-{i}"
            params = ray_pod(cluster, name, group, "worker", cluster_name=SERVE_CLUSTER, group=group["groupName"],
                             service=True, aliases=serve_svc)
            workers.append((name, params))
    assert workers, "the test values give the serving cluster a worker group"
    containers = {head: spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in spec.get("workerGroupSpecs", []):
        for i in range(group["replicas"]):
            containers[f"{SERVE_CLUSTER}-{group['groupName']}-worker-{i}"] = group["template"]["spec"]["containers"][0]
    return {"rayservice": rayservice, "head": head, "head_params": head_params, "workers": workers,
            "containers": containers}


def test_image_labels_the_ray_version_it_installs():
    labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", IMAGE).stdout) or {}
    assert labels.get("io.ray.version") == image_ray_version()
    user = podman("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip()
    assert user.split(":")[0] == "1000"


def wait_http(url: str, timeout: float) -> str:
    """GET `url` from outside the pod until it answers 200; its body ("" on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.text
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return ""


def test_probes_pass_in_head_and_worker(serving, cluster):
    """The chart's own probes where it sets them, else those KubeRay injects (exec `wget ... | grep success`):
    once the node answers from outside, they must pass within the kubelet's failure budget."""
    head, agent = serving["head"], kuberay.DEFAULT_AGENT_PORT
    assert "success" in wait_http(f"http://{cluster.ip(head)}:{kuberay.DEFAULT_DASHBOARD_PORT}/api/gcs_healthz",
                                  READY_S), cluster.logs(head)
    pods = [(head, "head", serving["head_params"])] + [(n, "worker", p) for n, p in serving["workers"]]
    for name, node_type, params in pods:
        assert "success" in wait_http(f"http://{cluster.ip(name)}:{agent}/api/local_raylet_healthz", READY_S)
        container = serving["containers"][name]
        probes = kuberay.container_probes(container, node_type, params, service=True)
        # a worker's readiness also asks Serve's proxy: checked once the app is deployed (next test)
        kinds = ("liveness", "readiness") if node_type == "head" else ("liveness",)
        for kind in kinds:
            ok, detail = cluster.wait_for_probe(name, container, probes[kind], kuberay.PROBE_BUDGET_S)
            assert ok, f"{name} {kind} probe {probes[kind]} failed: {detail}"
    # the httpGet probe KubeRay 1.7 uses instead when rayVersion >= 2.53 (the kubelet calls the pod's IP)
    version = serving["rayservice"]["spec"]["rayClusterConfig"]["rayVersion"]
    assert kuberay.supports_unified_health_check(version), version
    for name, _, params in pods:
        port = params["dashboard-agent-listen-port"]
        probe = {"httpGet": {"path": kuberay.UNIFIED_HEALTH_PATH, "port": int(port)}, "timeoutSeconds": 2}
        ok, detail = cluster.probe(name, {}, probe)
        assert ok, f"{name}: {detail}"


@pytest.fixture(scope="module")
def serve_app(serving, cluster):
    """serveConfigV2 applied as KubeRay's RayService controller does: YAML to JSON, PUT to the dashboard."""
    rayservice = serving["rayservice"]
    dashboard = f"http://{cluster.ip(serving['head'])}:{kuberay.DEFAULT_DASHBOARD_PORT}"
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    put = httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=60)
    assert put.status_code == 200, put.text
    app_name = config["applications"][0]["name"]
    deadline = time.monotonic() + 900
    status = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).json()
        app = status.get("applications", {}).get(app_name, {})
        if app.get("status") == "RUNNING":
            return {"config": config, "status": status}
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            break
        time.sleep(5)
    app = status.get("applications", {}).get(app_name, {})
    summary = {"status": app.get("status"), "message": app.get("message"),
               "deployments": {k: [d.get("status"), d.get("message")] for k, d in app.get("deployments", {}).items()}}
    pytest.fail(f"Serve app {app_name} not RUNNING: {json.dumps(summary, indent=1)[-6000:]}")


def test_serve_workers_pass_the_serve_readiness_probe(serve_app, serving, cluster):
    for name, params in serving["workers"]:
        container = serving["containers"][name]
        probe = kuberay.container_probes(container, "worker", params, service=True,
                                         serve_port=serve_app["config"]["http_options"]["port"])["readiness"]
        ok, detail = cluster.wait_for_probe(name, container, probe, kuberay.PROBE_BUDGET_S)
        assert ok, f"{name} readiness probe {probe} failed: {detail}"


def test_openai_client_chats_with_teacher_and_student(manifests, serve_app, serving, cluster):
    from openai import OpenAI

    port = serve_app["config"]["http_options"]["port"]
    # the serve Service's endpoints: the workers (always) and the head (the operator adds it when ready)
    for pod in [name for name, _ in serving["workers"]] + [serving["head"]]:
        client = OpenAI(base_url=f"http://{cluster.ip(pod)}:{port}/v1", api_key=serve_token(cluster, manifests) or "-",
                        max_retries=0, timeout=120)
        if serve_token(cluster, manifests):
            assert httpx.get(f"http://{cluster.ip(pod)}:{port}/v1/models", timeout=30).status_code == 401
        ids = [m.id for m in client.models.list().data]
        assert len(ids) >= 2, ids
        for model in ids[:2]:
            reply = client.chat.completions.create(model=model, max_tokens=8, temperature=1.0,
                                                   messages=[{"role": "user", "content": "Choose C or D."}])
            assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


def test_rayjob_entrypoint_runs_through_the_submitter_and_logs_to_mlflow(manifests, serve_app, cluster, mlflow):
    rayjob = one(manifests, "RayJob")
    name = rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    job_cluster = f"{name}-xy9zw"
    head_svc = f"{name}-head-svc"  # GenerateHeadServiceName for a RayJob
    head = f"{job_cluster}-head"
    ray_pod(cluster, head, spec["rayClusterSpec"]["headGroupSpec"], "head", cluster_name=job_cluster,
            group="headgroup", service=False,
            aliases=(kuberay.head_service(job_cluster, NAMESPACE), *service_aliases(head_svc)))
    dashboard = f"{head_svc}.{NAMESPACE}.svc.cluster.local:{kuberay.DEFAULT_DASHBOARD_PORT}"
    job_id = f"{name}-k2m4p"
    submitter = spec["submitterPodTemplate"]["spec"]
    out = cluster.run(f"{name}-submitter", IMAGE, submitter, submitter["containers"][0],
                      command=kuberay.SUBMITTER_COMMAND, args=kuberay.submitter_args(spec, dashboard, job_id),
                      extra_env={"RAY_DASHBOARD_ADDRESS": dashboard, "RAY_JOB_SUBMISSION_ID": job_id},
                      detach=False, timeout=JOB_S)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    job = httpx.get(f"http://{cluster.ip(head)}:{kuberay.DEFAULT_DASHBOARD_PORT}/api/jobs/{job_id}", timeout=30).json()
    assert job["status"] == "SUCCEEDED", json.dumps(job)[-3000:] + out.stdout[-3000:]
    assert job["entrypoint"] == spec["entrypoint"]
    # the run is on the MLflow server, asked from inside the cluster with the chart's tracking URI
    check = ("import json, os; from mlflow import MlflowClient; c = MlflowClient(os.environ['MLFLOW_TRACKING_URI']);"
             "runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])];"
             "print(json.dumps([[r.info.status, sorted(r.data.metrics)] for r in runs]))")
    runs = cluster.exec(head, ["python", "-c", check], timeout=120)
    assert runs.returncode == 0, runs.stderr[-3000:]
    finished = [r for r in json.loads(runs.stdout.strip().splitlines()[-1]) if r[0] == "FINISHED"]
    assert finished, runs.stdout
