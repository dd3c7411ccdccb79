"""The chart against what a real KubeRay cluster needs (issue 11, items 1-9 and part 5).

Rendered with the real helm, checked with real validators where they exist: the KubeRay CRDs' CEL
rules with cel-python, serveConfigV2 with Ray Serve's ServeDeploySchema, MLflow's own host check and
auth-config reader, the `hf` CLI's argument parser, and the routes of the installed Ray dashboard.
What KubeRay does with the objects (probe injection, serve-Service membership) is read from its
v1.7.0 source, see deploy/README.md.
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "tomtransfer"
sys.path.insert(0, str(REPO / "deploy" / "scripts"))
import chartcheck as cc  # noqa: E402

sys.path.pop(0)

CI_VALUES = CHART / "ci" / "all-jobs-values.yaml"
GPU_VALUES = CHART / "values-gpu.yaml"


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind):
    (found,) = by_kind(objs, kind)
    return found


def ray_containers(obj):
    """(where, container) of every Ray head/worker container of a RayService or RayJob."""
    for where, spec in cc.pod_specs(obj):
        if not where.endswith("submitter"):
            yield where, spec["containers"][0]


@pytest.fixture(scope="module")
def ci():
    return cc.render([CI_VALUES])


@pytest.fixture(scope="module")
def gpu():
    return cc.render([GPU_VALUES])


# ---- 1. probes ------------------------------------------------------------------------------------


def test_ray_containers_carry_http_probes_so_kuberay_injects_no_wget(ci, gpu):
    from ray._private import ray_constants

    agent_port = ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT
    for objs in (ci, gpu):
        for obj in by_kind(objs, "RayService") + by_kind(objs, "RayJob"):
            for where, c in ray_containers(obj):
                # KubeRay (pod.go initLivenessAndReadinessProbe) only fills probes that are nil
                for probe in ("livenessProbe", "readinessProbe"):
                    assert "exec" not in c[probe], (where, probe)
                assert c["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": agent_port}, where
                serving_worker = obj["kind"] == "RayService" and ".worker[" in where
                expected = ({"path": "/-/healthz", "port": 8000} if serving_worker
                            else {"path": "/api/healthz", "port": agent_port})
                assert c["readinessProbe"]["httpGet"] == expected, where


def test_probe_paths_are_routes_of_the_installed_ray():
    from ray.dashboard.modules.reporter import healthz_agent
    from ray.serve._private import proxy_request_response

    agent = inspect.getsource(healthz_agent)
    assert '@routes.get("/api/healthz")' in agent
    # the unified check covers the raylet and, on a head, the GCS
    assert "local_gcs_health" in agent and "raylet_health" in agent
    assert 'self.route_path == "/-/healthz"' in inspect.getsource(proxy_request_response)


def test_probes_follow_a_custom_agent_port():
    objs = cc.render([], {"rayService.head.rayStartParams": {"dashboard-agent-listen-port": "52400"}})
    head = one(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["livenessProbe"]["httpGet"]["port"] == 52400


# ---- 2. rayVersion --------------------------------------------------------------------------------


def test_ray_version_is_required_and_checked():
    with pytest.raises(cc.CheckError, match="/ray/version"):
        cc.helm_template([], {"ray.version": ""})
    with pytest.raises(cc.CheckError, match="/ray/version"):
        cc.helm_template([], {"ray.version": "latest"})
    objs = cc.render([CI_VALUES], {"ray.version": "2.61.1"})
    versions = {o["spec"]["rayClusterConfig" if o["kind"] == "RayService" else "rayClusterSpec"]["rayVersion"]
                for o in objs if o["kind"] in ("RayService", "RayJob")}
    assert versions == {"2.61.1"}


def test_chart_declares_the_kuberay_it_needs():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["tomtransfer.io/requires-kuberay"].startswith(">=1.4.0")
    deploy = (REPO / "deploy" / "scripts" / "deploy.sh").read_text()
    assert 'MIN_KUBERAY="1.4.0"' in deploy


# ---- 3. weights before the serving cluster --------------------------------------------------------


def test_gpu_values_download_the_models_before_the_head_starts(gpu):
    rs = one(gpu, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    inits = head["initContainers"]
    exp = yaml.safe_load(next(o for o in gpu if o["kind"] == "ConfigMap")["data"]["experiment.yaml"])
    wanted = {exp["models"]["teacher"]["model"], exp["models"]["student"]["model"]}
    assert {c["args"][1] for c in inits} == wanted
    for c in inits:
        assert c["command"] == ["hf"] and c["args"][0] == "download"
        assert c["args"].count("--include") == 3 and "*.safetensors" in c["args"]
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_HOME"]["value"] == "/data/hf"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    # workers start no download of their own
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert "initContainers" not in group["template"]["spec"]


def test_download_arguments_are_accepted_by_the_real_hf_cli(ci, gpu, tmp_path):
    hf = Path(sys.executable).with_name("hf")
    inits = [c for objs in (ci, gpu) for c in
             one(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "NO_COLOR": "1"}
    for c in inits:
        proc = subprocess.run([str(hf), *c["args"], "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
        # 2 is the CLI's usage error; offline, a well-formed download stops at the hub
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "DryRunError" in proc.stderr
    bad = subprocess.run([str(hf), "download", "a/b", "--allow-patterns", "*.json"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2


def test_model_download_needs_the_data_volume_and_repos():
    with pytest.raises(cc.CheckError, match="modelDownload needs storage.data.enabled"):
        cc.render([GPU_VALUES], {"storage.data.enabled": False})
    with pytest.raises(cc.CheckError, match="needs modelDownload.repos"):
        cc.render([], {"modelDownload.enabled": True})
    with pytest.raises(cc.CheckError, match="modelDownload/repos/0/id"):
        cc.render([], {"modelDownload.enabled": True, "modelDownload.repos": [{"id": "no-org"}]})


# ---- 4. the serving cluster changes only with the serving config ----------------------------------


def _serving(objs):
    rs = one(objs, "RayService")
    return rs["spec"]["rayClusterConfig"], rs["spec"]["serveConfigV2"]


def test_job_only_changes_leave_the_serving_cluster_alone():
    cluster, serve = _serving(cc.render([CI_VALUES]))
    changed = cc.render([CI_VALUES], {"experiment.training.num_workers": 3,
                                      "experiment.generate.samples": 7,
                                      "jobs.sweep.config": {"base": "/etc/tomtransfer/experiment.yaml",
                                                            "grid": {"sampling.seed": [5]}}})
    assert _serving(changed) == (cluster, serve)
    # the job pods do see the change
    jobs = {j["metadata"]["name"]: j for j in by_kind(changed, "RayJob")}
    before = {j["metadata"]["name"]: j for j in by_kind(cc.render([CI_VALUES]), "RayJob")}
    name = next(iter(jobs))
    ann = lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["annotations"]  # noqa: E731
    assert ann(jobs[name])["checksum/experiment"] != ann(before[name])["checksum/experiment"]


def test_a_serving_change_goes_to_serve_in_place_not_to_a_new_cluster():
    cluster, serve = _serving(cc.render([CI_VALUES]))
    cluster2, serve2 = _serving(cc.render([CI_VALUES], {"experiment.sampling.temperature": 0.3}))
    assert cluster2 == cluster  # KubeRay builds a new cluster only when rayClusterConfig changes
    assert serve2 != serve
    app = yaml.safe_load(serve2)["applications"][0]
    assert app["args"]["config_data"]["sampling"]["temperature"] == 0.3


# ---- 6. NetworkPolicy and the operator ------------------------------------------------------------


def _matches(peer: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())


def test_operator_admitted_whether_installed_by_helm_or_kustomize(ci):
    # pod labels of KubeRay v1.7.0's operator: helm-chart/kuberay-operator (name from the chart name)
    # and ray-operator/config/manager/manager.yaml (kustomize)
    helm_pod = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
    kustomize_pod = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}
    for np_name in ("tomtransfer-serve", "tomtransfer-jobs"):
        np = next(o for o in ci if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == np_name)
        rules = [r for r in np["spec"]["ingress"] if any(p.get("namespaceSelector") is not None for p in r["from"])]
        (rule,) = rules
        assert {"protocol": "TCP", "port": 8365} in rule["ports"]  # ray.dashboardPort in the ci values
        for pod in (helm_pod, kustomize_pod):
            assert any(_matches(p, pod) for p in rule["from"]), (np_name, pod)
        assert all(p["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
                   for p in rule["from"])
        assert not any(_matches(p, {"app.kubernetes.io/name": "other"}) for p in rule["from"])
    custom = cc.render([], {"networkPolicy.operatorPodSelectors": [{"team": "ray-ops"}]})
    np = next(o for o in custom if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "tomtransfer-serve")
    peers = [p for r in np["spec"]["ingress"] for p in r["from"] if "namespaceSelector" in p]
    assert [p["podSelector"]["matchLabels"] for p in peers] == [{"team": "ray-ops"}]


# ---- 7. MLflow -------------------------------------------------------------------------------------


def _mlflow(objs):
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-mlflow"))
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_accepts_port_forwards_to_any_local_port():
    from mlflow.server.security_utils import is_allowed_host_header

    c = _mlflow(cc.render([]))
    allowed = [h.strip() for h in next(e["value"] for e in c["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")]
    for host in ("localhost:15000", "127.0.0.1:5000", "localhost", "tomtransfer-mlflow.tomtransfer.svc:5000",
                 "tomtransfer-mlflow:5000"):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example.com", "evil.example.com:5000", "10.0.0.1:5000"):
        assert not is_allowed_host_header(allowed, host), host


def test_mlflow_basic_auth_option(ci, tmp_path, monkeypatch):
    c = _mlflow(ci)
    assert c["args"][c["args"].index("--app-name") + 1] == "basic-auth"
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": "password"}
    ini = next(o for o in ci if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-mlflow-auth"))
    mounted = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(next(p for p in mounted if "auth" in p))
    # the file, read by MLflow's own auth-config reader (loaded from its file: the auth package's
    # __init__ needs Flask-WTF, which only the server image needs)
    import importlib.util

    import mlflow

    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    read_auth_config = auth_config.read_auth_config

    path = tmp_path / "basic_auth.ini"
    path.write_text(ini["data"]["basic_auth.ini"])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "root")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "pw")
    cfg = read_auth_config()
    assert cfg.database_uri == "sqlite:////mlflow/basic_auth.db" and cfg.default_permission == "READ"
    assert cfg.admin_password == "pw"
    # every Ray pod logs in with the same Secret
    for obj in by_kind(ci, "RayService") + by_kind(ci, "RayJob"):
        for where, rc in ray_containers(obj):
            renv = {e["name"]: e for e in rc["env"]}
            assert renv["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin", where
    with pytest.raises(cc.CheckError, match="mlflow.auth.enabled needs mlflow.auth.existingSecret.name"):
        cc.render([], {"mlflow.auth.enabled": True})


def test_light_image_for_mlflow_submitters_and_test(ci):
    light = "registry.example.com/tomtransfer:0.1.0"
    assert _mlflow(ci)["image"] == light
    assert one(ci, "Pod")["spec"]["containers"][0]["image"] == light
    for job in by_kind(ci, "RayJob"):
        assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == light
        for _, c in ray_containers(job):
            assert c["image"] == "tomtransfer:0.1.0"
    gpu = cc.render([GPU_VALUES], {"lightImage.repository": "r/tt", "lightImage.tag": "0.1.0"})
    assert _mlflow(gpu)["image"] == "r/tt:0.1.0"
    assert all(c["image"].endswith("-gpu") for _, c in ray_containers(one(gpu, "RayService")))


# ---- 8. the dashboard port ------------------------------------------------------------------------


def test_dashboard_port_reaches_ray_start_and_kuberay(ci):
    for obj in by_kind(ci, "RayService") + by_kind(ci, "RayJob"):
        cluster = obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-port"] == "8365"
        # KubeRay finds the dashboard (operator, submitter: RAY_DASHBOARD_ADDRESS) by the port's name
        assert {"name": "dashboard", "containerPort": 8365} in head["template"]["spec"]["containers"][0]["ports"]


# ---- part 5: the real validators ------------------------------------------------------------------


def test_cel_rules_of_the_crds_are_evaluated(ci):
    rs = copy.deepcopy(one(ci, "RayService"))
    assert cc.validate_cel(rs) == []
    rs["spec"]["rayClusterConfig"]["managedBy"] = "someone-else"
    errors = cc.validate_cel(rs)
    assert errors == ["[CEL] spec/rayClusterConfig/managedBy: the managedBy field value must be either "
                      "'ray.io/kuberay-operator' or 'kueue.x-k8s.io/multikueue'"]
    # transition rules run on an update: managedBy is immutable
    old = copy.deepcopy(rs)
    old["spec"]["rayClusterConfig"]["managedBy"] = "ray.io/kuberay-operator"
    new = copy.deepcopy(old)
    new["spec"]["rayClusterConfig"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    assert "[CEL] spec/rayClusterConfig/managedBy: the managedBy field is immutable" in cc.validate_cel(new, old)
    assert cc.validate_cel(old, old) == []
    job = copy.deepcopy(by_kind(ci, "RayJob")[0])
    job["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert any("deletionStrategy" in e for e in cc.validate_cel(job))
    # and validate_objects runs them
    errors, _ = cc.validate_objects([*[o for o in ci if o["kind"] != "RayService"], rs])
    assert any("[CEL]" in e for e in errors)


def test_serve_config_is_validated_by_rays_own_schema(ci):
    rs = copy.deepcopy(one(ci, "RayService"))
    assert cc.check_serve_config(rs["spec"]["serveConfigV2"]) == []
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    cfg["proxy_location"] = "Nowhere"
    cfg["applications"].append(dict(cfg["applications"][0]))  # a duplicate name
    errors = cc.check_serve_config(yaml.safe_dump(cfg))
    assert any(e.startswith("proxy_location") for e in errors)
    assert any("multiple configs" in e for e in errors)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert any("serveConfigV2" in e for e in cc.check_kuberay(rs))
