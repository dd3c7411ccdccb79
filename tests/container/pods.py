"""Run a rendered Kubernetes container spec with podman, as a kubelet would run it.

Translated from the pod spec (nothing retyped): securityContext (runAsUser/runAsGroup, fsGroup as a
supplementary group that owns the volumes, readOnlyRootFilesystem without podman's extra tmpfs mounts,
dropped capabilities, no privilege escalation), volumes (configMap: its rendered files, read-only;
emptyDir: a fresh folder, or /dev/shm's size for a memory-backed one; persistentVolumeClaim: one host
folder per claim, shared by every pod that mounts it), env (literal values), resources.limits (cgroup
cpu and memory), command/args (command replaces the image's ENTRYPOINT, args its CMD). Pods get a
private podman network; Service names are network aliases.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.container.kuberay import quantity, quantity_value


def podman_argv() -> list[str]:
    # runc: crun's cgroup handling fails in nested containers such as this CI's machines.
    return ["podman", "--runtime", "runc"]


def podman(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([*podman_argv(), *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}... failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def ulimit_flags() -> list[str]:
    """Limits podman may set here: its defaults exceed the hard limits where the host is itself a container.

    Open files: the host's hard limit. Processes: at most 32768 (higher values are refused here although
    below the hard limit); the count is per uid, shared by every pod, and Ray starts many threads.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else nofile
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def run_once(image: str, argv: list[str]) -> str:
    """Run `argv` in a throwaway container of `image` (no network); its stdout."""
    return podman("run", "--rm", "--network", "none", *ulimit_flags(), "--entrypoint", json.dumps(argv[:1]),
                  image, *argv[1:]).stdout


@dataclass
class Cluster:
    """Pods on one private podman network, with their volumes under `root`."""

    network: str
    root: Path
    config_maps: dict[str, dict[str, str]]
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)

    def create(self) -> None:
        podman("network", "create", "--internal", self.network)

    def claim_dir(self, claim: str) -> Path:
        return self._dir("pvc", claim)

    def _dir(self, kind: str, name: str) -> Path:
        path = self.root / kind / name
        if not path.exists():
            path.mkdir(parents=True)
            path.chmod(0o2777 if kind == "emptydir" else 0o2775)
        return path

    def volume_flags(self, pod: str, pod_spec: dict, container: dict) -> list[str]:
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
        flags = []
        for mount in container.get("volumeMounts", []):
            vol = volumes[mount["name"]]
            ro = mount.get("readOnly", False)
            if "configMap" in vol:
                path = self._dir("configmap", f"{pod}-{mount['name']}")
                for key, text in self.config_maps[vol["configMap"]["name"]].items():
                    (path / key).write_text(text)
                    (path / key).chmod(0o644)
                ro = True  # configMap volumes are always read-only
            elif "emptyDir" in vol:
                empty = vol["emptyDir"] or {}
                if empty.get("medium") == "Memory" and mount["mountPath"] == "/dev/shm":
                    size = quantity_value(empty.get("sizeLimit", "64Mi"))
                    flags += ["--shm-size", str(size)]
                    continue
                path = self._dir("emptydir", f"{pod}-{mount['name']}")
            elif "persistentVolumeClaim" in vol:
                path = self.claim_dir(vol["persistentVolumeClaim"]["claimName"])
            else:
                raise ValueError(f"volume kind not handled: {vol}")
            if fs_group is not None:
                os.chown(path, 0, fs_group)  # the kubelet's fsGroup ownership
            flags += ["-v", f"{path}:{mount['mountPath']}:{'ro' if ro else 'rw'}"]
        return flags

    def run(self, pod: str, image: str, pod_spec: dict, container: dict, *, command: list[str] | None = None,
            args: list[str] | None = None, extra_env: dict[str, str] | None = None,
            aliases: tuple[str, ...] = (), detach: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        flags = ["--name", pod, "--hostname", pod, "--network", self.network, *ulimit_flags()]
        for alias in aliases:
            flags += ["--network-alias", alias]
        flags += security_flags(pod_spec.get("securityContext") or {}, container.get("securityContext") or {})
        flags += self.volume_flags(pod, pod_spec, container)
        for env in container.get("env", []):
            value = self.env_value(env)
            if value is not None:
                flags += ["-e", f"{env['name']}={value}"]
        for key, value in (extra_env or {}).items():
            flags += ["-e", f"{key}={value}"]
        limits = (container.get("resources") or {}).get("limits") or {}
        if "cpu" in limits:
            flags += ["--cpus", str(float(quantity(limits["cpu"])))]
        if "memory" in limits:
            flags += ["--memory", str(quantity_value(limits["memory"]))]
        command = command if command is not None else container.get("command")
        args = args if args is not None else container.get("args", [])
        if command:
            flags += ["--entrypoint", json.dumps(command)]
        self.started.append(pod)
        if detach:
            return podman("run", "-d", *flags, image, *args, timeout=timeout)
        try:
            return podman("run", *flags, image, *args, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            # still running after `timeout`: report it like `timeout` does (124), with what it printed
            return subprocess.CompletedProcess([pod], 124, self.logs(pod), f"{pod}: still running after {timeout} s")

    def env_value(self, env: dict) -> str | None:
        """A literal value, or a Secret's key (None: an optional reference to a missing Secret)."""
        if "value" in env:
            return str(env["value"])
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            raise ValueError(f"env {env['name']}: only values and secretKeyRefs are run here, got {env}")
        value = self.secrets.get(ref["name"], {}).get(ref["key"])
        if value is None and not ref.get("optional"):
            raise ValueError(f"env {env['name']}: Secret {ref['name']} has no key {ref['key']} (the kubelet would "
                             "not start the pod)")
        return value

    def exec(self, pod: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return podman("exec", pod, *argv, check=False, timeout=timeout)

    def ip(self, pod: str) -> str:
        out = podman("inspect", "-f", "{{json .NetworkSettings.Networks}}", pod).stdout
        return json.loads(out)[self.network]["IPAddress"]

    def logs(self, pod: str) -> str:
        out = podman("logs", pod, check=False)
        return (out.stdout + out.stderr)[-6000:]

    def running(self, pod: str) -> bool:
        return podman("inspect", "-f", "{{.State.Running}}", pod, check=False).stdout.strip() == "true"

    def probe(self, pod: str, container: dict, probe: dict) -> tuple[bool, str]:
        """One run of a Kubernetes probe (exec in the container; httpGet/tcpSocket from outside, as the kubelet)."""
        if "exec" in probe:
            out = self.exec(pod, probe["exec"]["command"], timeout=max(probe.get("timeoutSeconds", 1), 10) + 10)
            return out.returncode == 0, f"exit {out.returncode}: {out.stdout[-500:]}{out.stderr[-1500:]}"
        action = probe.get("httpGet") or probe.get("tcpSocket")
        port = action["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports", []) if p["name"] == port)
        if "tcpSocket" in probe:
            try:
                socket.create_connection((self.ip(pod), port), timeout=5).close()
                return True, "connected"
            except OSError as err:
                return False, str(err)
        url = f"{action.get('scheme', 'HTTP').lower()}://{self.ip(pod)}:{port}{action.get('path', '/')}"
        try:
            response = httpx.get(url, timeout=max(probe.get("timeoutSeconds", 1), 5))
        except httpx.HTTPError as err:
            return False, f"{url}: {err}"
        return 200 <= response.status_code < 400, f"{url}: {response.status_code} {response.text[:300]}"

    def wait_for_probe(self, pod: str, container: dict, probe: dict, timeout: float) -> tuple[bool, str]:
        """Run the probe until it passes; (False, last detail) after `timeout` or when the pod stops."""
        deadline = time.monotonic() + timeout
        while True:
            ok, detail = self.probe(pod, container, probe)
            if ok or time.monotonic() > deadline or not self.running(pod):
                return ok, detail
            time.sleep(3)

    def teardown(self) -> None:
        for pod in reversed(self.started):
            podman("rm", "-f", "-t", "5", pod, check=False)
        podman("network", "rm", "-f", self.network, check=False)


def security_flags(pod_ctx: dict, ctx: dict) -> list[str]:
    """The pod's and the container's securityContext as podman flags (the container's wins)."""
    merged = {**pod_ctx, **ctx}
    flags = []
    if "runAsUser" in merged:
        user = str(merged["runAsUser"])
        if "runAsGroup" in merged:
            user += f":{merged['runAsGroup']}"
        flags += ["--user", user]
    if merged.get("runAsNonRoot") and merged.get("runAsUser", 0) == 0:
        raise ValueError("runAsNonRoot with uid 0: the kubelet refuses to start this container")
    if "fsGroup" in pod_ctx:
        flags += ["--group-add", str(pod_ctx["fsGroup"])]
    if merged.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]
    caps = merged.get("capabilities") or {}
    for cap in caps.get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        flags += ["--cap-add", cap]
    if merged.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if (merged.get("seccompProfile") or {}).get("type") == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    return flags
