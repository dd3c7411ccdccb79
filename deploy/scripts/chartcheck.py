#!/usr/bin/env python3
"""Render the tomtransfer Helm chart and validate every object offline.

Used by `make deploy DRY_RUN=1` (deploy/deploy.mk) and by the tests (tests/test_deploy_*.py), so
both check exactly the same things:

* core objects (ConfigMap, Deployment, NetworkPolicy, ...) against the Kubernetes OpenAPI schemas
  shipped in `kubernetes-validate`, strict (unknown fields are errors), for the oldest and newest
  Kubernetes versions the chart supports;
* RayService / RayJob against the openAPIV3Schema of the KubeRay CRDs
  (`$TOMTRANSFER_KUBERAY_SCHEMAS`, default `../shared/k8s-schemas/kuberay-v1.7.0` beside the repo),
  made strict the way `kubectl apply --validate=strict` treats them, and their
  `x-kubernetes-validations` (CEL) rules evaluated by cel-python, as the API server does; their
  metadata against ObjectMeta, plus the checks of the KubeRay operator's Go validation
  (validation.go: name length, group sizes, ...), which no tool outside the operator runs;
* every RayService's serveConfigV2 with Ray's own `ray.serve.schema.ServeDeploySchema`;
* the pod specs inside all of them (volume mounts resolve, names are valid, security context);
* the rendered experiment ConfigMap with `shared.config.parse_config`;
* that no Secret value appears outside Secret objects.

CLI:
  chartcheck.py validate [-f VALUES ...] [--set K=V ...] [--release R] [--namespace NS] [--out FILE]
  chartcheck.py check-file FILE [--serve-import]   # validate rendered manifests (make DRY_RUN=1)
  chartcheck.py all                      # lint + validate default, cpu, gpu and ci/ values
  chartcheck.py refs FILE|-              # Secrets/claims/RWX PVCs the manifests need (deploy preflight)
  chartcheck.py sync-schema [--check]    # embed ExperimentConfig's JSON schema in values.schema.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tomtransfer"
GET_HELM = REPO / "deploy" / "scripts" / "get-helm.sh"
VALUES_SCHEMA = CHART / "values.schema.json"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.29.0", "1.35.0")
RENDER_KUBE_VERSION = "1.29.0"
KUBERAY_SCHEMAS_DEFAULT = REPO.parent / "shared" / "k8s-schemas" / "kuberay-v1.7.0"
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
CUSTOM_KINDS = set(CRD_FILES)
MAX_RAY_NAME = 47  # KubeRay: MaxRayClusterNameLength (53) - 6
CONSTRAINTS = REPO / "constraints.txt"
GENERATED_MARK = "x-generated-from"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)


class CheckError(Exception):
    """A failure whose message is meant for the user."""


def ray_pin() -> str:
    """The ray version pinned in constraints.txt (what the images install)."""
    for line in CONSTRAINTS.read_text().splitlines():
        m = re.match(r"^ray(?:\[[^]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            return m.group(1)
    raise CheckError(f"no ray pin in {CONSTRAINTS}")


def _with_ray_version(sets: dict[str, Any] | None) -> dict[str, Any]:
    """ray.version is required by the chart; renders here use the pinned one unless given."""
    return {"ray.version": ray_pin(), **(sets or {})}


# --------------------------------------------------------------------------------------------------
# helm


def helm_binary() -> str:
    """Path of helm, obtained by the same script the Makefile uses (cached after the first call)."""
    return _helm_binary_cached()


@functools.lru_cache(maxsize=1)
def _helm_binary_cached() -> str:
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    proc = subprocess.run(
        ["bash", str(GET_HELM)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise CheckError(f"could not obtain helm: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


def _value_args(values: Iterable[str | Path] = (), sets: dict[str, Any] | None = None,
                set_strings: dict[str, str] | None = None) -> list[str]:
    args: list[str] = []
    for f in values:
        args += ["-f", str(f)]
    for key, val in (sets or {}).items():
        if isinstance(val, (dict, list, bool, int, float)) or val is None:
            args += ["--set-json", f"{key}={json.dumps(val)}"]
        else:
            args += ["--set-string", f"{key}={val}"]
    for key, val in (set_strings or {}).items():
        args += ["--set-string", f"{key}={val}"]
    return args


def helm_template(values: Iterable[str | Path] = (), sets: dict[str, Any] | None = None,
                  release: str = "tomtransfer", namespace: str = "tomtransfer",
                  extra: Iterable[str] = ()) -> str:
    """`helm template` of the chart; raises CheckError with helm's message on failure."""
    cmd = [helm_binary(), "template", release, str(CHART), "--namespace", namespace,
           "--kube-version", RENDER_KUBE_VERSION, *_value_args(values, _with_ray_version(sets)), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CheckError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


def helm_lint(values: Iterable[str | Path] = (), sets: dict[str, Any] | None = None) -> str:
    cmd = [helm_binary(), "lint", "--strict", str(CHART), "--kube-version", RENDER_KUBE_VERSION,
           *_value_args(values, _with_ray_version(sets))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise CheckError(out)
    return out


def parse_manifests(text: str) -> list[dict]:
    return [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc]


def render(values: Iterable[str | Path] = (), sets: dict[str, Any] | None = None,
           release: str = "tomtransfer", namespace: str = "tomtransfer") -> list[dict]:
    return parse_manifests(helm_template(values, sets, release, namespace))


# --------------------------------------------------------------------------------------------------
# core objects: kubernetes-validate's bundled schemas, strict


@functools.cache
def _core_validator(kube_version: str, kind: str, api_version: str):
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    versions = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(kube_version)]
    if not versions:
        raise CheckError(f"kubernetes-validate has no schemas for Kubernetes {kube_version}")
    version = versions[-1]
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = kv.schema_contents(f"{schema_dir}/{kind.lower()}-{group}.json", kube_version)
    except FileNotFoundError:
        return None
    defs = _core_definitions(schema_dir, kube_version)
    registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(defs) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


@functools.cache
def _core_definitions(schema_dir: str, kube_version: str) -> dict:
    import kubernetes_validate.utils as kv

    return kv.schema_contents(f"{schema_dir}/_definitions.json", kube_version)


@functools.cache
def _object_meta_validator(kube_version: str):
    """Strict ObjectMeta schema, for the metadata of custom resources."""
    import jsonschema

    import kubernetes_validate.utils as kv

    versions = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(kube_version)]
    defs = _core_definitions(f"kubernetes-json-schema/v{versions[-1]}-local-strict", kube_version)
    meta = dict(defs["$defs"]["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"])
    meta["$defs"] = defs["$defs"]
    return jsonschema.validators.Draft202012Validator(meta)


def _fmt_error(err) -> str:
    path = "/".join(str(p) for p in err.absolute_path) or "<root>"
    msg = err.message
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{path}: {msg}"


def validate_core(obj: dict, kube_version: str) -> list[str]:
    validator = _core_validator(kube_version, obj["kind"], obj["apiVersion"])
    if validator is None:
        return [f"no Kubernetes {kube_version} schema for {obj['apiVersion']} {obj['kind']}"]
    return [f"[k8s {kube_version}] {_fmt_error(e)}" for e in validator.iter_errors(obj)]


# --------------------------------------------------------------------------------------------------
# custom resources: KubeRay CRD schemas


def kuberay_schemas_dir() -> Path:
    return Path(os.environ.get("TOMTRANSFER_KUBERAY_SCHEMAS", KUBERAY_SCHEMAS_DEFAULT))


def _strict_structural(schema: Any) -> Any:
    """An apiextensions structural schema as plain JSON Schema, rejecting unknown fields.

    The API server prunes unknown fields silently, and `kubectl apply` (field validation Strict,
    the default) rejects them: an object with properties and no additionalProperties or
    x-kubernetes-preserve-unknown-fields is closed here.
    """
    if isinstance(schema, list):
        return [_strict_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_structural(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_version_schema(kind: str, api_version: str) -> dict | None:
    """The CRD's openAPIV3Schema for this apiVersion (None: the CRD has no such version)."""
    directory = kuberay_schemas_dir()
    path = directory / CRD_FILES[kind]
    if not path.is_file():
        raise CheckError(f"KubeRay CRD schema not found: {path} (set TOMTRANSFER_KUBERAY_SCHEMAS)")
    crd = _yaml_load(path.read_text())
    group = crd["spec"]["group"]
    for version in crd["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            if not version.get("served", True):
                raise CheckError(f"{api_version} {kind} is not served by the CRD")
            return version["schema"]["openAPIV3Schema"]
    return None


@functools.cache
def _crd_validator(kind: str, api_version: str):
    import jsonschema

    schema = _crd_version_schema(kind, api_version)
    if schema is None:
        return None
    return jsonschema.validators.Draft7Validator(_strict_structural(schema))


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(schema: dict, value: Any, old: Any, path: str) -> Iterator[str]:
    """Evaluate every x-kubernetes-validations rule that applies to `value`, as the API server does.

    Transition rules (those using oldSelf) run only on an update, i.e. when `old` is given.
    """
    import celpy

    for v in schema.get("x-kubernetes-validations") or []:
        rule = v["rule"]
        uses_old = "oldSelf" in rule
        if uses_old and old is None:
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if uses_old:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            ok = _cel_program(rule).evaluate(activation)
        except celpy.CELEvalError as err:
            yield f"{path or '<root>'}: CEL rule {rule!r} could not be evaluated: {err}"
            continue
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            yield f"{path or '<root>'}: {v.get('message') or 'failed CEL rule ' + repr(rule)}"
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                old_child = old.get(key) if isinstance(old, dict) else None
                yield from _cel_errors(sub, child, old_child, f"{path}/{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        # Lists are compared element-wise only for transition rules of map/set lists; positional here.
        for i, child in enumerate(value):
            old_child = old[i] if isinstance(old, list) and i < len(old) else None
            yield from _cel_errors(schema["items"], child, old_child, f"{path}/{i}")


def validate_cel(obj: dict, old: dict | None = None) -> list[str]:
    """The CRD's CEL rules (x-kubernetes-validations) on a KubeRay object; `old`: the object it updates."""
    schema = _crd_version_schema(obj["kind"], obj["apiVersion"])
    if schema is None:
        return []
    return [f"[CEL] {e}" for e in _cel_errors(schema, obj, old, "")]


def validate_custom(obj: dict, kube_version: str) -> list[str]:
    validator = _crd_validator(obj["kind"], obj["apiVersion"])
    if validator is None:
        return [f"the KubeRay CRD has no version {obj['apiVersion']} for {obj['kind']}"]
    errors = [f"[CRD] {_fmt_error(e)}" for e in validator.iter_errors(obj)]
    errors += validate_cel(obj)
    meta_validator = _object_meta_validator(kube_version)
    errors += [f"[ObjectMeta] metadata/{_fmt_error(e)}"
               for e in meta_validator.iter_errors(obj.get("metadata", {}))]
    return errors


# --------------------------------------------------------------------------------------------------
# semantic checks (what the API server and the KubeRay webhook check beyond the schema)


def _check_labels(labels: dict | None, where: str) -> list[str]:
    errors = []
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
            errors.append(f"{where}: label key prefix {prefix!r} is not a DNS subdomain")
        if not name or len(name) > 63 or not LABEL_NAME.match(name):
            errors.append(f"{where}: invalid label key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(f"{where}: invalid label value {value!r} for {key!r}")
    return errors


def _check_name(obj: dict) -> list[str]:
    kind = obj["kind"]
    name = obj.get("metadata", {}).get("name", "")
    if kind in ("Service", "RayService", "RayJob", "RayCluster"):
        ok = len(name) <= 63 and bool(DNS1035_LABEL.match(name))
        rule = "DNS-1035 label"
    else:
        ok = len(name) <= 253 and bool(DNS1123_SUBDOMAIN.match(name))
        rule = "DNS-1123 subdomain"
    errors = [] if ok else [f"metadata.name {name!r} is not a {rule}"]
    if kind in ("RayService", "RayJob") and len(name) > MAX_RAY_NAME:
        errors.append(f"metadata.name {name!r} is longer than KubeRay's {MAX_RAY_NAME} characters")
    return errors


def _containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            yield field, c


def check_pod_spec(spec: dict, where: str, rendered_names: dict[str, set[str]]) -> list[str]:
    """Consistency checks of one PodSpec."""
    errors = []
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    if len(volumes) != len(spec.get("volumes") or []):
        errors.append(f"{where}: duplicate volume names")
    for v in spec.get("volumes") or []:
        if not DNS1123_LABEL.match(v.get("name", "")):
            errors.append(f"{where}: volume name {v.get('name')!r} is not a DNS-1123 label")
        cm = (v.get("configMap") or {}).get("name")
        if cm and cm not in rendered_names.get("ConfigMap", set()):
            errors.append(f"{where}: volume {v['name']!r} mounts ConfigMap {cm!r}, not in the release")
    names = set()
    for field, c in _containers(spec):
        cname = c.get("name", "")
        cwhere = f"{where}.{field}[{cname}]"
        if not DNS1123_LABEL.match(cname) or cname in names:
            errors.append(f"{cwhere}: container name must be a unique DNS-1123 label")
        names.add(cname)
        if not c.get("image"):
            errors.append(f"{cwhere}: no image")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                errors.append(f"{cwhere}: volumeMount {m.get('name')!r} has no volume")
        mount_paths = [m.get("mountPath") for m in c.get("volumeMounts") or []]
        if len(mount_paths) != len(set(mount_paths)):
            errors.append(f"{cwhere}: duplicate mountPath")
        port_names = [p.get("name") for p in c.get("ports") or [] if p.get("name")]
        for pn in port_names:
            if len(pn) > 15 or not PORT_NAME.match(pn) or not re.search("[a-z]", pn):
                errors.append(f"{cwhere}: port name {pn!r} is not an IANA service name")
        if len(port_names) != len(set(port_names)):
            errors.append(f"{cwhere}: duplicate port names")
        env_names = []
        for e in c.get("env") or []:
            env_names.append(e.get("name"))
            if not ENV_NAME.match(e.get("name", "")):
                errors.append(f"{cwhere}: invalid env name {e.get('name')!r}")
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is not None and not (ref.get("name") and ref.get("key")):
                errors.append(f"{cwhere}: env {e.get('name')} has an incomplete secretKeyRef")
        dup = {n for n in env_names if env_names.count(n) > 1}
        if dup:
            errors.append(f"{cwhere}: duplicate env vars {sorted(dup)}")
    for claim in (v.get("persistentVolumeClaim", {}).get("claimName")
                  for v in spec.get("volumes") or [] if v.get("persistentVolumeClaim")):
        if claim and claim not in rendered_names.get("PersistentVolumeClaim", set()):
            # An existing claim is allowed; it is only reported in the summary.
            pass
    return errors


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """Every PodSpec inside an object, with a readable location."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield f"Pod/{name}", spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield f"{kind}/{name}", spec["template"]["spec"]
    elif kind in ("RayService", "RayJob", "RayCluster"):
        cluster = spec.get("rayClusterConfig") if kind == "RayService" else (
            spec.get("rayClusterSpec") if kind == "RayJob" else spec)
        if cluster:
            yield f"{kind}/{name}.head", cluster["headGroupSpec"]["template"]["spec"]
            for g in cluster.get("workerGroupSpecs") or []:
                yield f"{kind}/{name}.worker[{g.get('groupName')}]", g["template"]["spec"]
        if kind == "RayJob" and spec.get("submitterPodTemplate"):
            yield f"{kind}/{name}.submitter", spec["submitterPodTemplate"]["spec"]


def _cluster_spec(obj: dict) -> dict | None:
    spec = obj.get("spec") or {}
    return {"RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec"),
            "RayCluster": spec}.get(obj["kind"])


def check_kuberay(obj: dict) -> list[str]:
    """The checks of the KubeRay operator (ray-operator/controllers/ray/utils/validation.go)."""
    errors: list[str] = []
    kind, spec = obj["kind"], obj.get("spec") or {}
    cluster = _cluster_spec(obj)
    if cluster:
        groups = [("head", cluster["headGroupSpec"])] + [
            (g.get("groupName"), g) for g in cluster.get("workerGroupSpecs") or []]
        names = [n for n, _ in groups[1:]]
        if len(names) != len(set(names)):
            errors.append("worker group names are not unique")
        for gname, g in groups:
            if not g["template"]["spec"].get("containers"):
                errors.append(f"group {gname}: the pod template has no container")
            params = g.get("rayStartParams") or {}
            if "labels" in params:
                errors.append(f"group {gname}: rayStartParams['labels'] is not supported")
            if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
                errors.append(f"group {gname}: resources set in both rayStartParams and resources")
            if gname != "head":
                lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
                rep = g.get("replicas", lo)
                if lo > hi:
                    errors.append(f"group {gname}: minReplicas {lo} > maxReplicas {hi}")
                if not lo <= rep <= hi:
                    errors.append(f"group {gname}: replicas {rep} not within [{lo}, {hi}]")
                if not DNS1123_LABEL.match(gname or ""):
                    errors.append(f"group {gname!r}: groupName is not a DNS-1123 label")
    if kind == "RayJob":
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("ttlSecondsAfterFinished must be >= 0")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            errors.append("activeDeadlineSeconds must be > 0")
        if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
            errors.append("backoffLimit must be >= 0")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
            errors.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
            errors.append("backoffLimit is incompatible with InteractiveMode")
        if mode != "K8sJobMode" and spec.get("submitterPodTemplate"):
            errors.append(f"submitterPodTemplate is only used in K8sJobMode, not {mode}")
        tmpl = spec.get("submitterPodTemplate")
        if tmpl and tmpl["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
            errors.append("the submitter pod template needs restartPolicy Never or OnFailure")
        if not str(spec.get("entrypoint", "")).strip():
            errors.append("entrypoint is empty")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        except yaml.YAMLError as err:
            errors.append(f"runtimeEnvYAML is not YAML: {err}")
    if kind == "RayService":
        strategy = (spec.get("upgradeStrategy") or {}).get("type")
        if strategy not in (None, "NewCluster", "None", "NewClusterWithIncrementalUpgrade"):
            errors.append(f"upgradeStrategy.type {strategy!r} is invalid")
        head_svc = cluster["headGroupSpec"].get("headService") if cluster else None
        if head_svc and head_svc.get("metadata", {}).get("name"):
            errors.append("headGroupSpec.headService.metadata.name must not be set")
        errors += [f"serveConfigV2: {e}" for e in check_serve_config(spec.get("serveConfigV2"))]
    return errors


def serve_config(obj: dict) -> dict:
    return yaml.safe_load(obj["spec"]["serveConfigV2"])


def check_serve_config(text: str | None) -> list[str]:
    """serveConfigV2 against Ray Serve's own deploy schema (what `PUT /api/serve/applications/` takes)."""
    if not text:
        return ["missing"]
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"not YAML: {err}"]
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as err:
        return [f"{'/'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
    return []


# --------------------------------------------------------------------------------------------------
# release-level checks


def experiment_documents(objs: list[dict]) -> dict[str, str]:
    """ConfigMap name -> experiment.yaml text, for every rendered experiment ConfigMap."""
    return {o["metadata"]["name"]: o["data"]["experiment.yaml"]
            for o in objs if o["kind"] == "ConfigMap" and "experiment.yaml" in (o.get("data") or {})}


def check_experiment(objs: list[dict]) -> list[str]:
    docs = experiment_documents(objs)
    if not docs:
        return ["no experiment ConfigMap was rendered"]
    try:
        sys.path.insert(0, str(REPO))
        from tomtransfer.shared.config import ConfigError, parse_config
    except ImportError as err:
        return [f"cannot import tomtransfer.shared.config to check the experiment ConfigMap: {err}"]
    finally:
        if sys.path and sys.path[0] == str(REPO):
            sys.path.pop(0)
    errors = []
    for name, text in docs.items():
        try:
            parse_config(yaml.safe_load(text), f"ConfigMap/{name}")
        except ConfigError as err:
            errors.append(str(err))
    return errors


def secret_values(objs: list[dict]) -> set[str]:
    import base64

    values = set()
    for o in objs:
        if o["kind"] != "Secret":
            continue
        for v in (o.get("data") or {}).values():
            values.add(base64.b64decode(v).decode("utf-8", "replace"))
        values.update((o.get("stringData") or {}).values())
    return {v for v in values if v}


def _strings(node: Any) -> Iterator[str]:
    """Every string (keys included) in a decoded object, multi-line documents parsed too."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif node is not None:
        yield str(node)


def check_no_secret_leak(objs: list[dict], extra_values: Iterable[str] = ()) -> list[str]:
    """No secret value (from Secret objects, or given) appears in any non-Secret object."""
    values = secret_values(objs) | {v for v in extra_values if v}
    errors = []
    for o in objs:
        if o["kind"] == "Secret":
            continue
        leaves = list(_strings(o))
        for v in values:
            if any(v in leaf for leaf in leaves):
                errors.append(f"{o['kind']}/{o['metadata']['name']}: contains a secret value")
    return errors


def check_security(objs: list[dict]) -> list[str]:
    """Every container: non-root, no privilege escalation, all capabilities dropped."""
    errors = []
    for o in objs:
        for where, spec in pod_specs(o):
            pod_sc = spec.get("securityContext") or {}
            for _, c in _containers(spec):
                sc = c.get("securityContext") or {}
                cw = f"{where}[{c.get('name')}]"
                if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
                    errors.append(f"{cw}: runAsNonRoot is not set")
                if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) == 0:
                    errors.append(f"{cw}: runs as uid 0")
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append(f"{cw}: allowPrivilegeEscalation is not false")
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    errors.append(f"{cw}: capabilities are not all dropped")
                if sc.get("privileged"):
                    errors.append(f"{cw}: privileged")
        if o["kind"] == "RayService":
            auto = (_cluster_spec(o) or {}).get("autoscalerOptions")
            if auto is not None:
                sc = auto.get("securityContext") or {}
                if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in (
                        (sc.get("capabilities") or {}).get("drop") or []):
                    errors.append(f"RayService/{o['metadata']['name']}: autoscaler securityContext too weak")
    return errors


def validate_objects(objs: list[dict], kube_versions: Iterable[str] = KUBE_VERSIONS,
                     check_config: bool = True) -> tuple[list[str], dict[str, int]]:
    """Validate a rendered release. Returns (errors, counts of validated objects by kind)."""
    errors: list[str] = []
    counts: dict[str, int] = {}
    rendered: dict[str, set[str]] = {}
    seen = set()
    for o in objs:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in o:
                errors.append(f"an object has no {key}: {str(o)[:120]}")
        rendered.setdefault(o.get("kind"), set()).add(o.get("metadata", {}).get("name"))
    if errors:
        return errors, counts
    for o in objs:
        ident = f"{o['kind']}/{o['metadata'].get('name')}"
        if ident in seen:
            errors.append(f"{ident}: rendered twice")
        seen.add(ident)
        errs: list[str] = []
        for kv in kube_versions:
            if o["kind"] in CUSTOM_KINDS:
                errs += validate_custom(o, kv)
            else:
                errs += validate_core(o, kv)
        errs += _check_name(o)
        errs += _check_labels(o["metadata"].get("labels"), "metadata.labels")
        if o["kind"] in CUSTOM_KINDS:
            errs += check_kuberay(o)
        for where, spec in pod_specs(o):
            errs += check_pod_spec(spec, where, rendered)
        if o["kind"] == "Deployment":
            sel = o["spec"]["selector"].get("matchLabels") or {}
            tl = o["spec"]["template"]["metadata"].get("labels") or {}
            if any(tl.get(k) != v for k, v in sel.items()):
                errs.append("selector does not match the pod template labels")
        if o["kind"] == "Service" and o["spec"].get("selector"):
            if not any(_selects(o["spec"]["selector"], p) for p in objs):
                errs.append("the selector matches no rendered pod template")
        errors += sorted({f"{ident}: {e}" for e in errs})
        counts[o["kind"]] = counts.get(o["kind"], 0) + 1
    errors += check_security(objs)
    errors += check_no_secret_leak(objs)
    if check_config:
        errors += check_experiment(objs)
    return errors, counts


def cluster_refs(objs: list[dict]) -> list[tuple[str, str, str]]:
    """What a release needs in the cluster before it is applied (deploy.sh's preflight):
    ("secret", name, "-") for every Secret it references and does not render, ("claim", name, "-")
    for every PVC it mounts and does not render, ("rwx", pvc, class or "-") for rendered
    ReadWriteMany claims."""
    rendered = {(o["kind"], o["metadata"]["name"]) for o in objs}
    refs: list[tuple[str, str, str]] = []

    def add(ref):
        if ref not in refs:
            refs.append(ref)

    for o in objs:
        if o["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in (o["spec"].get("accessModes") or []):
            add(("rwx", o["metadata"]["name"], o["spec"].get("storageClassName") or "-"))
        for _, spec in pod_specs(o):
            secrets = [s.get("name") for s in spec.get("imagePullSecrets") or []]
            for _, c in _containers(spec):
                secrets += [((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
                            for e in c.get("env") or []]
                secrets += [(e.get("secretRef") or {}).get("name") for e in c.get("envFrom") or []]
            for v in spec.get("volumes") or []:
                secrets.append((v.get("secret") or {}).get("secretName"))
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and ("PersistentVolumeClaim", claim) not in rendered:
                    add(("claim", claim, "-"))
            for name in secrets:
                if name and ("Secret", name) not in rendered:
                    add(("secret", name, "-"))
    return refs


def _selects(selector: dict, obj: dict) -> bool:
    if obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Pod"):
        return False
    labels = (obj["spec"]["template"]["metadata"] if obj["kind"] != "Pod" else obj["metadata"]).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def build_serve_apps(objs: list[dict], workdir: Path) -> list[tuple[str, Any]]:
    """Import and build every application of every rendered RayService, without starting Ray.

    Files the apps read from the release's ConfigMaps (args pointing into the config mount, e.g.
    {"config": "/etc/tomtransfer/experiment.yaml"}) are written under `workdir` and the args are
    pointed there. Returns (application name, what the import path gave) pairs.
    """
    import importlib

    files = {}
    for o in objs:
        if o["kind"] == "ConfigMap":
            for key, text in (o.get("data") or {}).items():
                files[key] = text
    built = []
    for o in objs:
        if o["kind"] != "RayService":
            continue
        for app in serve_config(o)["applications"]:
            args = dict(app.get("args") or {})
            for key, val in list(args.items()):
                if isinstance(val, str) and val.startswith("/etc/tomtransfer/"):
                    name = val.rsplit("/", 1)[-1]
                    if name not in files:
                        raise CheckError(f"{app['name']}: args.{key} {val} is in no rendered ConfigMap")
                    path = workdir / name
                    path.write_text(files[name])
                    args[key] = str(path)
            module_name, _, attr = app["import_path"].replace(":", ".").rpartition(".")
            if str(REPO) not in sys.path:
                sys.path.insert(0, str(REPO))
            target = getattr(importlib.import_module(module_name), attr)
            from ray.serve import Application

            built.append((app["name"], target if isinstance(target, Application) else target(args)))
    return built


def check_serve_import(objs: list[dict]) -> list[str]:
    import tempfile

    try:
        from ray.serve import Application
    except ImportError as err:
        return [f"cannot import ray.serve to build the serve app: {err}"]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            built = build_serve_apps(objs, Path(tmp))
        except Exception as err:  # the import or the builder failed: report it
            return [f"serve app does not import/build: {type(err).__name__}: {err}"]
        for name, app in built:
            if not isinstance(app, Application):
                errors.append(f"serve app {name}: the builder returned {type(app).__name__}, "
                              "not a ray.serve.Application")
    return errors


# --------------------------------------------------------------------------------------------------
# values.schema.json: the experiment section is generated from tomtransfer.shared.config.ExperimentConfig


def experiment_schema_defs() -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    try:
        from tomtransfer.shared.config import ExperimentConfig
    finally:
        sys.path.pop(0)
    schema = ExperimentConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})
    schema[GENERATED_MARK] = ("tomtransfer.shared.config.ExperimentConfig (regenerate: "
                              "python deploy/scripts/chartcheck.py sync-schema)")
    defs["ExperimentConfig"] = schema
    for d in defs.values():
        d[GENERATED_MARK] = schema[GENERATED_MARK]
    return defs


def synced_values_schema() -> tuple[dict, dict]:
    current = json.loads(VALUES_SCHEMA.read_text())
    updated = copy.deepcopy(current)
    kept = {k: v for k, v in updated.get("$defs", {}).items() if GENERATED_MARK not in v}
    generated = experiment_schema_defs()
    clash = set(kept) & set(generated)
    if clash:
        raise CheckError(f"chart schema definitions clash with ExperimentConfig models: {sorted(clash)}")
    updated["$defs"] = {**kept, **dict(sorted(generated.items()))}
    return current, updated


def sync_schema(check: bool) -> int:
    current, updated = synced_values_schema()
    if current == updated:
        print(f"{VALUES_SCHEMA.relative_to(REPO)} is in sync with shared.config.ExperimentConfig")
        return 0
    if check:
        print(f"{VALUES_SCHEMA.relative_to(REPO)} is out of date with shared.config.ExperimentConfig: "
              "run `python deploy/scripts/chartcheck.py sync-schema`", file=sys.stderr)
        return 1
    VALUES_SCHEMA.write_text(json.dumps(updated, indent=2) + "\n")
    print(f"updated {VALUES_SCHEMA.relative_to(REPO)}")
    return 0


# --------------------------------------------------------------------------------------------------
# CLI


def standard_value_sets() -> dict[str, list[Path]]:
    sets = {"default": [], "cpu": [CHART / "values-cpu.yaml"], "gpu": [CHART / "values-gpu.yaml"]}
    for f in sorted((CHART / "ci").glob("*-values.yaml")):
        sets[f"ci/{f.name}"] = [f]
    return sets


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise CheckError(f"--set {item!r}: expected KEY=VALUE")
        out[key] = val
    return out


def _summary(counts: dict[str, int]) -> str:
    core = sum(n for k, n in counts.items() if k not in CUSTOM_KINDS)
    custom = sum(n for k, n in counts.items() if k in CUSTOM_KINDS)
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    return f"{core + custom} objects ({core} core, {custom} KubeRay): {kinds}"


def cmd_validate(args) -> int:
    sets = _parse_sets(args.set)
    text = helm_template(args.values, None, args.release, args.namespace,
                         extra=[a for k, v in sets.items() for a in ("--set-string", f"{k}={v}")])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"rendered manifests: {args.out}")
    objs = parse_manifests(text)
    errors, counts = validate_objects(objs)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    print(("FAILED: " if errors else "OK: ") + _summary(counts)
          + f"; Kubernetes {', '.join(KUBE_VERSIONS)}; KubeRay schemas {kuberay_schemas_dir()}")
    return 1 if errors else 0


def cmd_check_file(args) -> int:
    objs = parse_manifests(Path(args.file).read_text())
    errors, counts = validate_objects(objs)
    if args.serve_import:
        errors += check_serve_import(objs)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    print(("FAILED: " if errors else "OK: ") + _summary(counts)
          + f"; Kubernetes {', '.join(KUBE_VERSIONS)}; KubeRay schemas {kuberay_schemas_dir()}"
          + ("; serve app builds" if args.serve_import and not errors else ""))
    return 1 if errors else 0


def cmd_refs(args) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    for ref in cluster_refs(parse_manifests(text)):
        print(" ".join(ref))
    return 0


def cmd_all(args) -> int:
    failed = False
    total = 0
    for name, files in standard_value_sets().items():
        try:
            helm_lint(files)
            objs = render(files)
        except CheckError as err:
            print(f"FAILED {name}: {err}", file=sys.stderr)
            failed = True
            continue
        errors, counts = validate_objects(objs)
        total += sum(counts.values())
        for e in errors:
            print(f"ERROR [{name}] {e}", file=sys.stderr)
        failed |= bool(errors)
        print(f"{'FAILED' if errors else 'OK'} [{name}] lint + {_summary(counts)}")
    print(f"{total} objects validated")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="render with the given values and validate")
    v.add_argument("-f", "--values", action="append", default=[])
    v.add_argument("--set", action="append", default=[], help="KEY=VALUE (string)")
    v.add_argument("--release", default="tomtransfer")
    v.add_argument("--namespace", default="tomtransfer")
    v.add_argument("--out", help="also write the rendered manifests to this file")
    c = sub.add_parser("check-file", help="validate already rendered manifests")
    c.add_argument("file")
    c.add_argument("--serve-import", action="store_true",
                   help="also import and build the RayService's serve application")
    r = sub.add_parser("refs", help="list the Secrets, claims and RWX PVCs rendered manifests need")
    r.add_argument("file", help="rendered manifests, '-' for stdin")
    sub.add_parser("all", help="lint and validate the default, cpu, gpu and ci values")
    s = sub.add_parser("sync-schema", help="embed ExperimentConfig's JSON schema in values.schema.json")
    s.add_argument("--check", action="store_true", help="only report whether it is in sync")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "validate":
            return cmd_validate(args)
        if args.cmd == "check-file":
            return cmd_check_file(args)
        if args.cmd == "all":
            return cmd_all(args)
        if args.cmd == "refs":
            return cmd_refs(args)
        return sync_schema(args.check)
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
