"""deploy/scripts/deploy.sh (make deploy / rollback / undeploy / deploy-pipeline) against stand-ins.

There is no Kubernetes API server here, so `kubectl` is a stand-in (tests/fixtures/fake_kubectl.py) that answers
from a cluster described in a JSON file and logs every call; `helm` is a stand-in that logs and hands
`template` and `lint` to the real helm (so what deploy.sh renders, preflights and creates is the real
chart); `podman` answers the image's io.ray.version label; `skopeo` must not be reached. The tests
assert the commands deploy.sh issues and its exit codes.
"""

from __future__ import annotations

import json
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
from tests.fixtures.fake_kubectl import fake_kubectl  # noqa: E402,F401 - the stand-in, a stdlib-only script

IMAGE = "registry.example.com/tt:0.1.0"
SCRIPT_COMMANDS = {"deploy": "deploy", "deploy-pipeline": "pipeline", "rollback": "rollback", "undeploy": "undeploy"}
MLFLOW_READY = "tomtransfer-mlflow"


def _cluster(**over) -> dict:
    """A cluster with KubeRay 1.7 (Helm-installed), the namespace, the default token Secret, an NFS
    default StorageClass, and a RayService that becomes ready for the applied generation 2 only
    after an upgrade (observedGeneration|Ready|UpgradeInProgress|pending cluster)."""
    state = {
        "context": "test-context",
        "crds": ["rayservices.ray.io", "rayjobs.ray.io", "rayclusters.ray.io"],
        "operator": {"app.kubernetes.io/name=kuberay-operator": "quay.io/kuberay/operator:v1.7.0"},
        "namespaces": ["exp"],
        "secrets": ["tomtransfer-api-token", "hf-token"],
        "storageclasses": {"nfs": {"provisioner": "nfs.csi.k8s.io", "default": True}},
        "deployments": [MLFLOW_READY],
        "rayservice": {"generation": 2, "active": "tomtransfer-b2",
                       "statuses": ["1|True||", "2|True|True|tomtransfer-b2", "2|True|False|"]},
    }
    state.update(over)
    return state


@pytest.fixture()
def tools(tmp_path):
    """(run, calls, state): run(target, *make_args, cluster=...) -> CompletedProcess."""
    real_helm = cc.helm_binary()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    state_file = tmp_path / "cluster.json"
    scripts = {
        # a script of its own (no pytest import): deploy.sh calls kubectl about 40 times per pipeline
        "kubectl": f'exec "{sys.executable}" -I "{REPO / "tests" / "fixtures" / "fake_kubectl.py"}" "$@"',
        "helm": f'echo "helm $*" >> "{log}"\n'
                f'case "$1" in template|lint) exec "{real_helm}" "$@" ;; version) echo v4.1.4 ;; esac',
        "podman": f'echo "podman $*" >> "{log}"\n'
                  '[ -n "$FAKE_RAY_LABEL" ] && [ "$1 $2" = "image inspect" ] && { echo "$FAKE_RAY_LABEL"; exit 0; }\n'
                  'exit 125',
        "skopeo": f'echo "skopeo $*" >> "{log}"\nexit 1',
    }
    for tool, body in scripts.items():
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def run(target: str, *args: str, cluster: dict | None = None, label: str | None = "2.60.0",
            via_make: bool = False, timeout: int = 180) -> subprocess.CompletedProcess:
        state_file.write_text(json.dumps(cluster if cluster is not None else _cluster()))
        log.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CLUSTER": str(state_file),
               "FAKE_LOG": str(log), "HELM": str(bin_dir / "helm"), "KUBECTL": str(bin_dir / "kubectl"),
               "POLL_S": "0"}
        for key in ("FAKE_RAY_LABEL", "IMAGE", "JOBS", "RUN_ID", "VALUES", "NAMESPACE", "RELEASE", "REVISION",
                    "LIGHT_IMAGE", "RAY_VERSION", "TIMEOUT", "STAGES", "HELM_ARGS"):
            env.pop(key, None)
        if label:
            env["FAKE_RAY_LABEL"] = label
        if via_make:
            cmd = ["make", "--no-print-directory", "-f", str(REPO / "deploy" / "deploy.mk"), target,
                   f"DEPLOY_PYTHON={sys.executable}", *args]
        else:  # the script itself, for its exit codes (make turns every failure into 2)
            env.update(a.split("=", 1) for a in args)
            env["PYTHON"] = sys.executable
            cmd = ["bash", str(REPO / "deploy" / "scripts" / "deploy.sh"), SCRIPT_COMMANDS[target]]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)

    def calls(prefix: str = "") -> list[str]:
        return [c for c in log.read_text().splitlines() if c.startswith(prefix)]

    return run, calls, lambda: json.loads(state_file.read_text())


def _created(calls) -> list[dict]:
    text = "\n".join(calls())
    docs = []
    while "STDIN<<" in text:
        text = text.split("STDIN<<\n", 1)[1]
        manifest, text = text.split("\n>>STDIN", 1)
        docs += [d for d in yaml.safe_load_all(manifest) if d]
    return docs


# ---- deploy ---------------------------------------------------------------------------------------


def test_deploy_preflights_installs_and_waits_for_the_new_cluster(tools):
    run, calls, state = tools
    digest = "sha256:" + "ab" * 32
    proc = run("deploy", f"IMAGE=registry.example.com/tt@{digest}", "NAMESPACE=exp",
               "LIGHT_IMAGE=registry.example.com/tt:0.1.0", f"VALUES={CHART / 'values-gpu.yaml'}")
    assert proc.returncode == 0, proc.stderr
    kubectl = calls("kubectl")
    # preflight: CRDs, the operator and its version, the namespace, every referenced Secret, the RWX class
    assert "kubectl get crd rayservices.ray.io" in kubectl
    assert any("get deployments --all-namespaces -l app.kubernetes.io/name=kuberay-operator" in c for c in kubectl)
    assert "KubeRay operator 1.7.0" in proc.stderr
    assert {"kubectl -n exp get secret tomtransfer-api-token", "kubectl -n exp get secret hf-token"} <= set(kubectl)
    assert "kubectl get storageclass nfs -o jsonpath={.provisioner}" in kubectl
    (upgrade,) = calls("helm upgrade")
    assert upgrade.startswith(f"helm upgrade --install tomtransfer {CHART} --namespace exp --timeout 10m "
                              f"-f {CHART / 'values-gpu.yaml'} --set-string image.repository=registry.example.com/tt "
                              f"--set-string image.digest={digest} "
                              "--set-string lightImage.repository=registry.example.com/tt "
                              "--set-string lightImage.tag=0.1.0 --set-string ray.version=2.60.0"), upgrade
    assert "jobs." not in upgrade and "--atomic" not in upgrade
    # rayVersion from the image's label (podman), the registry never asked
    assert "ray 2.60.0 (label io.ray.version of registry.example.com/tt@" in proc.stderr
    assert calls("skopeo") == []
    # Ready from the old generation, then an upgrade in progress, do not end the wait: only the third
    assert state()["rayservice"]["statuses"] == ["2|True|False|"]
    polls = [c for c in kubectl if "observedGeneration" in c]
    assert len(polls) == 3
    assert "RayService tomtransfer ready (cluster tomtransfer-b2)" in proc.stderr
    assert "kubectl -n exp rollout status deployment/tomtransfer-mlflow --timeout 10m" in kubectl
    first_write = next(i for i, c in enumerate(calls()) if c.startswith("helm upgrade"))
    assert all(not c.startswith("kubectl -n exp create") for c in calls()[:first_write])


def test_ray_version_falls_back_to_the_constraints_pin(tools):
    run, calls, _ = tools
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", label=None)
    assert proc.returncode == 0, proc.stderr
    assert f"ray {cc.ray_pin()} (constraints.txt" in proc.stderr
    (upgrade,) = calls("helm upgrade")
    assert upgrade.endswith(f"--set-string ray.version={cc.ray_pin()}")
    assert len(calls("skopeo inspect --no-tags")) == 1  # asked, answered nothing


@pytest.mark.parametrize("args, message", [
    ((), "IMAGE is not set"),
    ((f"IMAGE={IMAGE}", "JOBS=teleport"), "unknown stage 'teleport'"),
    ((f"IMAGE={IMAGE}", "RUN_ID=Bad_Id"), "RUN_ID 'Bad_Id'"),
    ((f"IMAGE={IMAGE}", "VALUES=/nonexistent.yaml"), "values file not found"),
])
def test_bad_input_exits_2_before_anything_is_issued(tools, args, message):
    run, calls, _ = tools
    proc = run("deploy", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert calls("kubectl") == [] and calls("helm upgrade") == []


@pytest.mark.parametrize("change, message", [
    ({"crds": []}, "CRD rayservices.ray.io is missing: install the KubeRay operator first"),
    ({"operator": {}}, "no KubeRay operator Deployment found"),
    ({"operator": {"app.kubernetes.io/name=kuberay-operator": "quay.io/kuberay/operator:v1.3.2"}},
     "KubeRay operator 1.3.2 (quay.io/kuberay/operator:v1.3.2) is older than 1.4.0"),
    ({"secrets": []}, "Secret tomtransfer-api-token does not exist in exp"),
    ({"namespaces": []}, "namespace exp does not exist"),
    ({"storageclasses": {}}, "no default StorageClass"),
])
def test_preflight_refuses_an_unready_cluster(tools, change, message):
    run, calls, _ = tools
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", cluster=_cluster(**change))
    assert proc.returncode == 1
    assert message in proc.stderr
    assert calls("helm upgrade") == []


def test_a_kustomize_installed_operator_is_found(tools):
    run, _, _ = tools
    op = {"app.kubernetes.io/component=kuberay-operator": "quay.io/kuberay/operator:v1.6.1"}
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", cluster=_cluster(operator=op))
    assert proc.returncode == 0, proc.stderr
    assert "KubeRay operator 1.6.1" in proc.stderr


def test_a_cluster_that_never_gets_ready_fails_with_status_and_events(tools):
    run, calls, _ = tools
    stuck = _cluster(rayservice={"generation": 2, "statuses": ["1|True||", "2|True|True|tomtransfer-b2"]})
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", "TIMEOUT=2s", cluster=stuck)
    assert proc.returncode == 1
    assert "did not become ready; `make rollback`" in proc.stderr
    assert "kubectl -n exp describe rayservice/tomtransfer" in calls("kubectl")
    assert "kubectl -n exp get events --sort-by=.lastTimestamp" in calls("kubectl")
    assert "(stand-in describe rayservice/tomtransfer)" in proc.stderr


# ---- jobs: created outside the release ------------------------------------------------------------


def test_jobs_are_created_with_kubectl_not_helm(tools):
    run, calls, state = tools
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", "JOBS=train,evaluate", "RUN_ID=r9")
    assert proc.returncode == 0, proc.stderr
    (upgrade,) = calls("helm upgrade")
    assert "jobs." not in upgrade  # the release holds no RayJob
    assert calls("kubectl -n exp create -f - -o name") == ["kubectl -n exp create -f - -o name"]
    jobs = _created(calls)
    assert sorted(j["metadata"]["name"] for j in jobs) == ["tomtransfer-evaluate-r9", "tomtransfer-train-r9"]
    assert all(j["kind"] == "RayJob" and j["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0" for j in jobs)
    assert "created RayJob tomtransfer-train-r9" in proc.stderr
    assert set(state()["rayjobs"]) == {"tomtransfer-evaluate-r9", "tomtransfer-train-r9"}


def test_a_reused_run_id_is_refused(tools):
    run, calls, _ = tools
    used = _cluster(rayjobs={"tomtransfer-train-r9": ["Complete SUCCEEDED"]})
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", "JOBS=train", "RUN_ID=r9", cluster=used)
    assert proc.returncode == 2
    assert "run id r9 was used already" in proc.stderr
    assert [c for c in calls("kubectl") if " create " in c] == []


def test_without_run_id_every_submission_gets_a_new_one(tools):
    run, calls, _ = tools
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", "JOBS=generate")
    assert proc.returncode == 0, proc.stderr
    (job,) = _created(calls)
    run_id = job["metadata"]["labels"]["tomtransfer.io/run-id"]
    assert run_id.startswith("r2") and len(run_id) == 11 and job["metadata"]["name"].endswith(run_id)


def test_pipeline_waits_through_retries_and_succeeds(tools):
    run, calls, _ = tools
    retrying = ["Initializing ", "Running RUNNING", "Running FAILED", "Retrying FAILED", "Running RUNNING",
                "Complete SUCCEEDED"]
    proc = run("deploy-pipeline", f"IMAGE={IMAGE}", "NAMESPACE=exp", "RUN_ID=p1",
               cluster=_cluster(job_statuses=retrying))
    assert proc.returncode == 0, proc.stderr
    assert "pipeline p1 done: generate train evaluate" in proc.stderr
    creates = [c for c in calls("kubectl") if " create " in c]
    assert len(creates) == 3  # one stage after another
    for stage in ("generate", "train", "evaluate"):
        assert f"tomtransfer-{stage}-p1: Retrying FAILED" in proc.stderr
        assert f"tomtransfer-{stage}-p1: succeeded" in proc.stderr


@pytest.mark.parametrize("final", ["Failed FAILED", "Complete FAILED", "ValidationFailed "])
def test_pipeline_stops_at_a_final_failure(tools, final):
    run, calls, _ = tools
    proc = run("deploy-pipeline", f"IMAGE={IMAGE}", "NAMESPACE=exp", "RUN_ID=p2",
               cluster=_cluster(job_statuses=["Running RUNNING", "Running FAILED", final]))
    assert proc.returncode == 1
    assert f"tomtransfer-generate-p2: {final.strip()}" in proc.stderr
    assert len([c for c in calls("kubectl") if " create " in c]) == 1  # train never submitted
    assert "kubectl -n exp describe rayjob/tomtransfer-generate-p2" in calls("kubectl")


# ---- rollback and undeploy ------------------------------------------------------------------------


def test_make_deploy_and_rollback_targets_drive_the_script(tools):
    run, calls, _ = tools
    proc = run("deploy", f"IMAGE={IMAGE}", "NAMESPACE=exp", "JOBS=train", "RUN_ID=m1", via_make=True)
    assert proc.returncode == 0, proc.stderr
    assert len(calls("helm upgrade")) == 1 and [j["metadata"]["name"] for j in _created(calls)] == ["tomtransfer-train-m1"]
    assert run("deploy", via_make=True).returncode != 0  # IMAGE unset
    proc = run("rollback", "NAMESPACE=exp", via_make=True)
    assert proc.returncode == 0, proc.stderr
    assert calls("helm rollback") == ["helm rollback tomtransfer --namespace exp --timeout 10m"]


def test_rollback_returns_to_a_revision_and_waits_for_its_cluster(tools):
    run, calls, state = tools
    proc = run("rollback", "NAMESPACE=exp", "REVISION=3")
    assert proc.returncode == 0, proc.stderr
    assert calls("helm rollback") == ["helm rollback tomtransfer 3 --namespace exp --timeout 10m"]
    assert state()["rayservice"]["statuses"] == ["2|True|False|"]
    assert run("rollback", "REVISION=last").returncode == 2


def test_undeploy_uninstalls_and_keeps_the_volumes(tools):
    run, calls, _ = tools
    proc = run("undeploy", "NAMESPACE=exp", "RELEASE=tt")
    assert proc.returncode == 0, proc.stderr
    assert calls("helm uninstall") == ["helm uninstall tt --namespace exp --wait --timeout 10m"]
    assert "delete pvc -l app.kubernetes.io/instance=tt" in proc.stderr
