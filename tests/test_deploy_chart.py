"""The Helm chart deploy/helm/tomtransfer, checked offline (no cluster, no Docker).

helm comes from deploy/scripts/get-helm.sh (PATH, else a pinned binary cached in
~/.cache/tomtransfer/bin), the script `make helm` runs. Validation is deploy/scripts/chartcheck.py,
the code `make deploy DRY_RUN=1` runs: kubernetes-validate --strict for core objects, the KubeRay
CRD schemas (../shared/k8s-schemas/kuberay-v1.7.0, or $TOMTRANSFER_KUBERAY_SCHEMAS) for RayService
and RayJob.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tomtransfer.shared.config import ExperimentConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "tomtransfer"


def _load_chartcheck():
    spec = importlib.util.spec_from_file_location("chartcheck", REPO / "deploy" / "scripts" / "chartcheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chartcheck"] = module
    spec.loader.exec_module(module)
    return module


cc = _load_chartcheck()

VALUE_SETS = cc.standard_value_sets()
STAGES = ("generate", "train", "evaluate", "sweep")
SECRET_SENTINELS = {
    "hfToken": "hf_SENTINEL_token_6b1d0c",
    "teacherApiKey": "sk-SENTINEL-teacher-93af",
    "serveAuthToken": "SENTINEL-serve-bearer-4e2a",
}


@pytest.fixture(scope="session")
def helm() -> str:
    """A helm binary, obtained exactly as `make helm` obtains it."""
    path = cc.helm_binary()
    assert os.access(path, os.X_OK), path
    return path


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: cc.render(files) for name, files in VALUE_SETS.items()}


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def experiment_cm(objs: list[dict]) -> dict:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-experiment")]
    return cm


def render_fails(sets: dict, files=()) -> str:
    with pytest.raises(cc.CheckError) as err:
        cc.render(files, sets)
    return str(err.value)


# ---- lint and validation of every values file ---------------------------------------------------


def test_value_sets_cover_default_cpu_gpu_and_all_jobs():
    assert {"default", "cpu", "gpu", "ci/all-jobs-values.yaml"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict(helm, name):
    out = cc.helm_lint(VALUE_SETS[name])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_validates(rendered, name):
    objs = rendered[name]
    errors, counts = cc.validate_objects(objs)
    assert errors == []
    expected = {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                "NetworkPolicy", "RayService", "Pod"}
    assert expected <= set(counts)
    # every object was checked against a schema: core ones by kubernetes-validate, RayService/RayJob
    # by the KubeRay CRDs
    assert sum(counts.values()) == len(objs)


def test_all_jobs_values_render_every_rayjob(rendered):
    jobs = by_kind(rendered["ci/all-jobs-values.yaml"], "RayJob")
    assert sorted(j["metadata"]["labels"]["tomtransfer.io/stage"] for j in jobs) == sorted(STAGES)
    for name in ("default", "cpu", "gpu"):
        assert by_kind(rendered[name], "RayJob") == []  # stages are opt-in


def test_validator_is_not_vacuous(rendered):
    """Broken objects are caught: unknown fields, wrong types, bad names, dangling mounts."""
    objs = rendered["ci/all-jobs-values.yaml"]
    rs = copy.deepcopy(one(objs, "RayService"))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # typo: unknown field
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    errors = cc.validate_custom(rs, "1.29.0")
    assert any("rayStartParam" in e for e in errors) and any("maxReplicas" in e for e in errors)

    job = copy.deepcopy(by_kind(objs, "RayJob")[0])
    job["spec"]["shutdownAfterJobFinishes"] = False  # a TTL then makes no sense to KubeRay
    job["metadata"]["name"] = "x" * 48
    errors = cc.check_kuberay(job) + cc._check_name(job)
    assert any("ttlSecondsAfterFinished" in e for e in errors)
    assert any("47" in e for e in errors)

    dep = copy.deepcopy(one(objs, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert cc.validate_core(dep, "1.29.0")
    pod_spec = dep["spec"]["template"]["spec"]
    pod_spec["containers"][0]["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    assert any("nowhere" in e for e in cc.check_pod_spec(pod_spec, "d", {}))


# ---- RayService ----------------------------------------------------------------------------------


def test_rayservice_serves_the_project_app(rendered):
    for name in ("default", "cpu", "gpu"):
        rs = one(rendered[name], "RayService")
        cfg = cc.serve_config(rs)
        (app,) = cfg["applications"]
        assert app["import_path"] == "tomtransfer.services.teacher.app:build_app"
        assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
        # the serving part of the experiment is inline (Serve applies a change in place) and is the
        # ConfigMap's experiment, less the job-only sections
        (key,) = app["args"]
        assert key == "config_data"
        inline = parse_config(app["args"]["config_data"])
        full = parse_config(yaml.safe_load(experiment_cm(rendered[name])["data"]["experiment.yaml"]))
        for section in ("name", "output_dir", "models", "sampling", "scenarios", "serving", "mlflow"):
            assert getattr(inline, section) == getattr(full, section), section
        assert not {"generate", "training", "evaluate"} & set(app["args"]["config_data"])


def test_gpu_values_request_gpus_with_placement_and_autoscaling(rendered):
    rs = one(rendered["gpu"], "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    spec = group["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 4
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # the head has no GPU, and only an autoscaling head mounts a service-account token
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"].get("limits", {})
    assert head["automountServiceAccountToken"] is True
    assert spec["automountServiceAccountToken"] is False
    assert one(rendered["gpu"], "RayService")["spec"]["excludeHeadPodFromServeSvc"] is True
    assert ":0.1.0-gpu" in spec["containers"][0]["image"]


def test_cpu_values_have_no_gpu_anywhere(rendered):
    text = yaml.safe_dump_all(rendered["cpu"])
    assert "nvidia.com/gpu" not in text
    assert one(rendered["cpu"], "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False


# ---- RayJobs -------------------------------------------------------------------------------------


def test_rayjobs_run_the_cli_with_the_configmap(rendered):
    objs = rendered["ci/all-jobs-values.yaml"]
    cm = experiment_cm(objs)
    assert set(cm["data"]) == {"experiment.yaml", "sweep.yaml"}
    for job in by_kind(objs, "RayJob"):
        stage = job["metadata"]["labels"]["tomtransfer.io/stage"]
        spec = job["spec"]
        config = "/etc/tomtransfer/sweep.yaml" if stage == "sweep" else "/etc/tomtransfer/experiment.yaml"
        assert spec["entrypoint"].startswith(f"tomtransfer {stage} --config {config}")
        assert job["metadata"]["name"] == f"tomtransfer-{stage}-ci1"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] == 600
        assert spec["backoffLimit"] == 1
        assert spec["activeDeadlineSeconds"] > 0
        assert spec["submitterConfig"]["backoffLimit"] == 2
        assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False
        for where, pod in cc.pod_specs(job):
            if where.endswith("submitter"):
                continue
            vols = {v["name"]: v for v in pod["volumes"]}
            assert vols["experiment-config"]["configMap"]["name"] == cm["metadata"]["name"]
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["HF_HUB_OFFLINE"]["value"] == "1"
            # the model caches the serving pods fill, shared on the data volume
            assert env["TOMTRANSFER_CACHE"]["value"] == "/data/cache"
            assert env["HF_HOME"]["value"] == "/data/hf"
    evaluate = next(j for j in by_kind(objs, "RayJob") if j["metadata"]["name"].endswith("evaluate-ci1"))
    assert evaluate["spec"]["entrypoint"].endswith("--estimator exact")
    train = next(j for j in by_kind(objs, "RayJob") if "-train-" in j["metadata"]["name"])
    assert train["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2


def test_sweep_needs_its_config(helm):
    msg = render_fails({"jobs.sweep.enabled": True, "jobs.render": True})
    assert "jobs.sweep.config is required" in msg


def test_gpu_train_job_gets_gpu_workers(helm):
    objs = cc.render([CHART / "values-gpu.yaml"], {"jobs.train.enabled": True, "jobs.render": True})
    (job,) = by_kind(objs, "RayJob")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 4
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    cfg = parse_config(yaml.safe_load(experiment_cm(objs)["data"]["experiment.yaml"]))
    assert cfg.training.use_gpu and cfg.training.num_workers == 4


# ---- the experiment ConfigMap --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_experiment_configmap_parses_and_points_in_cluster(rendered, name):
    objs = rendered[name]
    cm = experiment_cm(objs)
    cfg = parse_config(yaml.safe_load(cm["data"]["experiment.yaml"]), f"ConfigMap/{cm['metadata']['name']}")
    assert isinstance(cfg, ExperimentConfig)
    ns = "tomtransfer"
    mlflow_svc = next(s for s in by_kind(objs, "Service")
                      if s["metadata"]["labels"]["app.kubernetes.io/component"] == "mlflow")
    port = mlflow_svc["spec"]["ports"][0]["port"]
    assert cfg.mlflow.tracking_uri == f"http://{mlflow_svc['metadata']['name']}.{ns}.svc:{port}"
    # KubeRay names the serve Service <RayService name>-serve-svc and serves on the "serve" port
    rs = one(objs, "RayService")
    assert cfg.serving.base_url == f"http://{rs['metadata']['name']}-serve-svc.{ns}.svc:8000"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    assert str(cfg.output_dir).startswith("/data/")


def test_user_experiment_settings_win_over_chart_defaults(helm):
    objs = cc.render([], {"experiment.mlflow.tracking_uri": "http://mlflow.example.com",
                          "experiment.serving.base_url": "http://serve.example.com:9000",
                          "experiment.output_dir": "/srv/runs"})
    cfg = parse_config(yaml.safe_load(experiment_cm(objs)["data"]["experiment.yaml"]))
    assert cfg.mlflow.tracking_uri == "http://mlflow.example.com"
    assert cfg.serving.base_url == "http://serve.example.com:9000"
    assert str(cfg.output_dir) == "/srv/runs"


def test_values_schema_embeds_the_current_experiment_config():
    current, updated = cc.synced_values_schema()
    assert current == updated, "run: python deploy/scripts/chartcheck.py sync-schema"


# ---- secrets only by reference -------------------------------------------------------------------


def _env(pod_spec: dict) -> dict[str, dict]:
    return {e["name"]: e for c in pod_spec["containers"] for e in c.get("env", [])}


def test_secret_references_and_no_value_in_any_configmap(helm):
    # Pre-created secrets referenced by name, plus (ignored, since names win) inline values.
    sets = {f"secrets.inline.{k}": v for k, v in SECRET_SENTINELS.items()}
    objs = cc.render([CHART / "ci" / "all-jobs-values.yaml", CHART / "values-gpu.yaml"], sets)
    text = yaml.safe_dump_all(objs)
    for value in SECRET_SENTINELS.values():
        assert value not in text
    assert by_kind(objs, "Secret") == []
    cfg = parse_config(yaml.safe_load(experiment_cm(objs)["data"]["experiment.yaml"]))
    assert cfg.serving.auth_token_env == "TOMTRANSFER_API_TOKEN"
    rs = one(objs, "RayService")
    for _, pod in cc.pod_specs(rs):
        env = _env(pod)
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["TEACHER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "teacher-api", "key": "api-key"}
        assert env["TOMTRANSFER_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "serve-auth"
    for job in by_kind(objs, "RayJob"):
        for where, pod in cc.pod_specs(job):
            # the remote teacher's key stays with the serving app
            assert "TEACHER_API_KEY" not in _env(pod), where
    mlflow = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert _env(mlflow)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert _env(mlflow)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert "--backend-store-uri" not in mlflow["containers"][0]["args"]
    # every env var that carries a secret uses valueFrom, never a literal value
    for o in objs:
        for where, pod in cc.pod_specs(o):
            for name, e in _env(pod).items():
                if any(s in name for s in ("TOKEN", "KEY", "SECRET", "PASSWORD")):
                    assert "value" not in e, f"{where}: {name} has a literal value"


def test_inline_dev_secrets_live_only_in_the_secret(helm):
    openai_teacher = {"experiment.models.teacher.engine": "openai",
                      "experiment.models.teacher.base_url": "https://api.example.com/v1",
                      "experiment.models.teacher.remote_model": "llama-2-70b-chat"}
    sets = {**{f"secrets.inline.{k}": v for k, v in SECRET_SENTINELS.items()}, **openai_teacher}
    objs = cc.render([CHART / "ci" / "all-jobs-values.yaml"],
                     {**sets, "secrets.hfToken.name": "", "secrets.teacherApiKey.name": "",
                      "secrets.serveAuthToken.name": ""})
    secret = one(objs, "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == SECRET_SENTINELS
    for o in objs:
        if o["kind"] == "Secret":
            continue
        dumped = yaml.safe_dump(o)
        for value in SECRET_SENTINELS.values():
            assert value not in dumped, f"{o['kind']}/{o['metadata']['name']} leaks a secret"
    assert cc.check_no_secret_leak(objs) == []
    for cm in by_kind(objs, "ConfigMap"):
        for text in cm["data"].values():
            for value in SECRET_SENTINELS.values():
                assert value not in text
    cfg = parse_config(yaml.safe_load(experiment_cm(objs)["data"]["experiment.yaml"]))
    assert cfg.models.teacher.api_key_env == "TEACHER_API_KEY"  # a name, not the key
    env = _env(one(objs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"])
    assert env["TEACHER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                   "key": "teacherApiKey"}
    # the helm test authenticates with the same token, by reference
    test_pod = one(objs, "Pod")
    assert _env(test_pod["spec"])["SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "serveAuthToken"


def test_leak_check_catches_a_value_in_a_configmap(rendered):
    objs = copy.deepcopy(rendered["default"])
    objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                 "data": {"k": base64.b64encode(b"hunter2-secret").decode()}})
    experiment_cm(objs)["data"]["experiment.yaml"] += "# hunter2-secret\n"
    assert cc.check_no_secret_leak(objs)


# ---- security ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_container_is_locked_down(rendered, name):
    objs = rendered[name]
    assert cc.check_security(objs) == []
    containers = 0
    for o in objs:
        for where, pod in cc.pod_specs(o):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 1000
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["serviceAccountName"] == "tomtransfer"
            for c in pod["containers"]:
                containers += 1
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert c["resources"].get("limits"), f"{where}: no resource limits"
    assert containers >= 3
    sa = one(objs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in objs}


def test_network_policy_only_lets_jobs_reach_serve_and_mlflow(rendered):
    objs = rendered["ci/all-jobs-values.yaml"]
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "NetworkPolicy")}
    jobs = policies["tomtransfer-jobs"]
    assert jobs["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "job"
    assert set(jobs["policyTypes"]) == {"Ingress", "Egress"}
    reachable = set()
    for rule in jobs["egress"]:
        targets = rule.get("to")
        if targets is None:  # DNS only
            assert {p["port"] for p in rule["ports"]} == {53}
            continue
        for peer in targets:
            assert set(peer) == {"podSelector"}, "jobs may only reach pods of the release"
            reachable.add((peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
                           tuple(p["port"] for p in rule.get("ports", []))))
    assert reachable == {("job", ()), ("serve", (8000,)), ("mlflow", (5000,))}
    # every job pod (head, workers, submitter) carries the label the policy selects
    for job in by_kind(objs, "RayJob"):
        for where, _ in cc.pod_specs(job):
            tmpl = job["spec"]
            labels = (tmpl["submitterPodTemplate"]["metadata"]["labels"] if where.endswith("submitter")
                      else None)
            if labels is not None:
                assert labels["app.kubernetes.io/component"] == "job"
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
        assert head["app.kubernetes.io/component"] == "job"
    for name in ("tomtransfer-serve", "tomtransfer-mlflow", "tomtransfer-test"):
        assert name in policies
    serve_from = [peer for rule in policies["tomtransfer-serve"]["ingress"] for peer in rule["from"]]
    assert any(p.get("namespaceSelector") == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
               for p in serve_from)


# ---- bad values are rejected with a clear message -------------------------------------------------


BAD_VALUES = [
    ({"rayService.workerGroups": [{"name": "cpu", "replicas": -1, "minReplicas": 0, "maxReplicas": 2,
                                   "resources": {}}]}, "replicas"),
    ({"image.repository": ""}, "repository"),
    ({"image.tag": "bad tag!"}, "tag"),
    ({"rayService.replicas": 3}, "replicas"),  # unknown key: a typo is not silently ignored
    ({"experiment.models.teacher.engine": "tensorrt"}, "engine"),
    ({"experiment.sampling.temperatur": 0.5}, "temperatur"),
    ({"experiment.generate.samples": 0}, "samples"),
    ({"jobs.runId": "Run_1"}, "runId"),
    ({"jobs.submissionMode": "Batch"}, "submissionMode"),
    ({"jobs.generate.args": ["--x; rm -rf /"]}, "args"),
    ({"jobs.backoffLimit": -1}, "backoffLimit"),
    ({"containerSecurityContext.allowPrivilegeEscalation": True}, "allowPrivilegeEscalation"),
    ({"podSecurityContext.runAsNonRoot": False}, "runAsNonRoot"),
    ({"rayService.workerGroups": [{"name": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 2,
                                   "gpus": -2, "resources": {}}]}, "gpus"),
    ({"storage.data.size": "lots"}, "size"),
    ({"mlflow.port": 70000}, "port"),
    ({"secrets.hfToken.name": "Not_A_Name"}, "hfToken"),
]


@pytest.mark.parametrize("sets,field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_schema_rejects_bad_values(helm, sets, field):
    msg = render_fails(sets)
    assert "values don't meet the specifications of the schema" in msg or "schema" in msg.lower()
    assert field in msg, msg


def test_template_checks_reject_inconsistent_groups(helm):
    msg = render_fails({"rayService.workerGroups": [{"name": "cpu", "replicas": 1, "minReplicas": 3,
                                                     "maxReplicas": 2, "resources": {}}]})
    assert "minReplicas (3) is greater than maxReplicas (2)" in msg
    msg = render_fails({"rayService.workerGroups": [{"name": "cpu", "replicas": 5, "minReplicas": 1,
                                                     "maxReplicas": 2, "resources": {}}]})
    assert "must lie between" in msg


def test_names_too_long_for_kuberay_are_rejected(helm):
    msg = render_fails({"fullnameOverride": "a-very-long-release-name-for-kuberay-x", "jobs.generate.enabled": True,
                        "jobs.render": True})
    assert "longer than KubeRay's 47 characters" in msg
    with pytest.raises(cc.CheckError, match="DNS-1035"):
        cc.render([], None, release="9lives")


# ---- make deploy DRY_RUN=1 ------------------------------------------------------------------------


def test_make_deploy_dry_run_renders_and_validates(helm, tmp_path):
    out = tmp_path / "release.yaml"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-f", str(REPO / "deploy" / "deploy.mk"), "deploy", "DRY_RUN=1",
         "IMAGE=registry.example.com:5000/ml/tomtransfer:1.2.3", "JOBS=generate,evaluate", "RUN_ID=r7",
         f"VALUES={CHART / 'values-cpu.yaml'}", "NAMESPACE=exp", "RELEASE=tt", "SERVE_IMPORT=0",
         f"DEPLOY_PYTHON={sys.executable}", f"DRY_RUN_OUT={out}"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: " in proc.stdout
    objs = cc.parse_manifests(out.read_text())
    rs = one(objs, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.example.com:5000/ml/tomtransfer:1.2.3"
    assert sorted(j["metadata"]["name"] for j in by_kind(objs, "RayJob")) == [
        "tt-tomtransfer-evaluate-r7", "tt-tomtransfer-generate-r7"]
    cfg = parse_config(yaml.safe_load(experiment_cm(objs)["data"]["experiment.yaml"]))
    assert cfg.serving.base_url == "http://tt-tomtransfer-serve-svc.exp.svc:8000"


def test_make_deploy_dry_run_fails_on_bad_values(helm, tmp_path):
    proc = subprocess.run(
        ["make", "--no-print-directory", "-f", str(REPO / "deploy" / "deploy.mk"), "deploy-dry-run",
         "JOBS=teleport", f"DEPLOY_PYTHON={sys.executable}", f"DRY_RUN_OUT={tmp_path / 'x.yaml'}"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown stage 'teleport'" in proc.stderr


# ---- NOTES.txt and the `helm test` pod ------------------------------------------------------------


def _notes(helm, tmp_path, *sets: str) -> str:
    args = [a for kv in (f"ray.version={cc.ray_pin()}", *sets) for a in ("--set", kv)]
    proc = subprocess.run(
        [helm, "install", "tt", str(CHART), "--dry-run=client", "--namespace", "demo", *args],
        capture_output=True, text=True, env={**os.environ, "KUBECONFIG": str(tmp_path / "none")}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


def test_notes_explain_how_to_reach_the_release(helm, tmp_path):
    notes = _notes(helm, tmp_path)
    assert "port-forward svc/tt-tomtransfer-serve-svc 8000:8000" in notes
    assert "port-forward svc/tt-tomtransfer-mlflow 5000:5000" in notes
    assert "get rayjob -l app.kubernetes.io/instance=tt" in notes
    assert "make deploy IMAGE=... JOBS=generate" in notes
    assert "helm test tt -n demo" in notes
    assert "Bearer <token>`, the token in Secret tomtransfer-api-token" in notes
    assert "OPEN" not in notes


def test_open_endpoints_need_an_explicit_opt_in_and_are_announced(helm, tmp_path):
    msg = render_fails({"secrets.serveAuthToken.name": ""})
    assert "secrets.serveAuthToken.name is empty" in msg and "allow_open" in msg
    notes = _notes(helm, tmp_path, "secrets.serveAuthToken.name=", "experiment.serving.allow_open=true")
    assert "WARNING: THE OPENAI ENDPOINTS ARE OPEN" in notes


def test_jobs_are_not_part_of_the_release(helm, tmp_path):
    msg = render_fails({"jobs.train.enabled": True})
    assert "not part of the Helm release" in msg and "make deploy JOBS=train" in msg
    for name in ("default", "cpu", "gpu"):
        assert by_kind(cc.render(VALUE_SETS[name]), "RayJob") == []


class _Endpoints:
    """A stand-in serving app and MLflow on 127.0.0.1 for the helm test pod's script."""

    def __init__(self, models: list[str], token: str | None = None):
        import http.server
        import json
        import threading

        outer = self
        self.seen_auth: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                outer.seen_auth.append(self.headers.get("Authorization"))
                if self.path == "/v1/models":
                    if token and self.headers.get("Authorization") != f"Bearer {token}":
                        body, status = b'{"error": "unauthorized"}', 401
                    else:
                        data = [{"id": m, "object": "model"} for m in models]
                        body = json.dumps({"object": "list", "data": data}).encode()
                        status = 200
                elif self.path == "/health":
                    body, status = b"OK", 200
                else:
                    body, status = b"not found", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _run_test_pod(pod: dict, url: str, timeout_s: str = "3", token: str | None = None):
    container = pod["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    env = {"PATH": os.environ["PATH"], "TIMEOUT_S": timeout_s, "SERVE_URL": url, "MLFLOW_URL": url}
    if token:
        env["SERVE_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", container["command"][2]], capture_output=True, text=True,
                          env=env, timeout=60)


def test_helm_test_pod_checks_models_and_mlflow_health(rendered):
    pod = one(rendered["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["SERVE_URL"] == "http://tomtransfer-serve-svc.tomtransfer.svc:8000"
    assert env["MLFLOW_URL"] == "http://tomtransfer-mlflow.tomtransfer.svc:5000"
    with _Endpoints(["teacher", "student", "student:tom"]) as ep:
        proc = _run_test_pod(pod, ep.url)
    assert proc.returncode == 0, proc.stderr
    assert "serve OK, models: teacher, student, student:tom" in proc.stdout
    assert "mlflow OK" in proc.stdout
    with _Endpoints([]) as ep:  # an app that serves no model fails the test
        proc = _run_test_pod(pod, ep.url)
    assert proc.returncode != 0 and "lists no model" in proc.stderr


def test_helm_test_pod_sends_the_bearer_token(rendered):
    pod = one(rendered["ci/all-jobs-values.yaml"], "Pod")
    with _Endpoints(["teacher"], token="t0ken") as ep:
        assert _run_test_pod(pod, ep.url, token="t0ken").returncode == 0
        assert "Bearer t0ken" in ep.seen_auth
        assert _run_test_pod(pod, ep.url, timeout_s="1", token="wrong").returncode != 0
