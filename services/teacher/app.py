"""The serving app: teacher and student as named models on one OpenAI-compatible HTTP API (Ray Serve).

Import path for `serve run` / a RayService `serveConfigV2`: `tomtransfer.services.teacher.app:build_app`, with args
`{"config": "/path/to/experiment.yaml"}` (or `{"config_data": {...}}`, the config inline). Locally:
`tomtransfer serve --config FILE` (services/cli.py, on services/teacher/serving.py).

Layout: one ingress deployment (FastAPI, `tomtransfer-ingress`, 0 CPUs) routes to two engine deployments,
`tomtransfer-teacher` and `tomtransfer-student` (`ModelServer`, one engine each, chosen by
`models.<role>.engine` through the registry in `engines/base.py`; replicas/CPUs/GPUs from the same spec).

The four jobs live in four modules; this one only builds the application from a config (and keeps every name
that Serve configs, Helm values and callers import from `services.teacher.app`):

- services/teacher/schemas.py  - request/response bodies, the OpenAI-style error, errors across the Ray boundary
- services/teacher/adapters.py - adapter sources: the policy for `POST /v1/adapters` (security) and fetching
- services/teacher/replica.py  - `ModelServer`, the engine replica deployment
- services/teacher/ingress.py  - `Ingress` and its FastAPI `api`: the HTTP API (documented there)
"""

import os

from ray import serve

from tomtransfer.services.teacher.adapters import (  # noqa: F401  (re-exported: the adapter surface)
    ADAPTER_REFUSED,
    MLFLOW_SCHEMES,
    AdapterPolicy,
    AdapterSourceError,
    adapter_cache_dir,
    effective_adapter_root,
    fetch_adapter,
    find_adapter_folder,
)
from tomtransfer.services.teacher.ingress import Ingress, api  # noqa: F401  (re-exported: `api` is the HTTP app)
from tomtransfer.services.teacher.replica import ModelServer
from tomtransfer.services.teacher.schemas import ROLES, APIError, check_adapter_name, error_body  # noqa: F401
from tomtransfer.shared.errors import UserError


def _load(args: dict):
    from tomtransfer.shared.config import load_config, parse_config

    if "config_data" in args:
        return parse_config(args["config_data"], "<config_data>")
    if "config" in args:
        return load_config(args["config"])
    raise UserError("build_app needs args {'config': PATH} or {'config_data': {...}}")


def replica_actor_options(spec) -> dict:
    """Ray actor options of a `ModelServer` replica for the model spec `spec`.

    Its OpenMP threads spin only briefly at a barrier, then sleep (`GOMP_SPINCOUNT=10000`; libgomp reads it when the
    replica's process starts, hence the runtime env). A replica runs at nice 15 (Ray's workers) beside other
    processes; a thread that spins on holds its core, so the thread stuck on the contended core cannot move there
    and every kernel waits for it. fp32 sampling beside one busy neighbour: 0.97 tokens/s as torch ships, 5.4 with
    this spin count, 6.6 with OMP_WAIT_POLICY=PASSIVE; alone: 14.2, 13.4 and 11.8 (passive also cost the demo's fp32
    student a third of its exact-mode rate); the bf16 path is indifferent (benchmarks/results/cpu_contention.json,
    cpu_passive.json, cpu_spin.json). `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` in the environment that builds the app
    wins."""
    env = {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if os.environ.get(k)} or \
        {"GOMP_SPINCOUNT": "10000"}
    return {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "runtime_env": {"env_vars": env}}


def build_app(args: dict) -> serve.Application:
    """The Serve application for an experiment config (`args`: {"config": path} or {"config_data": dict})."""
    cfg = _load(dict(args or {}))
    serving = cfg.serving.model_dump(mode="json")
    for name in serving["adapters"]:
        check_adapter_name(name)
    serving["adapter_root"] = root = effective_adapter_root(cfg)
    tracking = cfg.mlflow.tracking_uri
    apps = {}
    info = {}
    for role in ROLES:
        spec = getattr(cfg.models, role)
        info[role] = {"model": spec.model, "engine": spec.engine}
        apps[role] = ModelServer.options(
            name=f"tomtransfer-{role}", num_replicas=spec.num_replicas,
            ray_actor_options=replica_actor_options(spec),
        ).bind(role, spec.model_dump(mode="json"), tracking, root, cfg.serving.max_adapters)
    defaults = {"temperature": cfg.sampling.temperature, "max_tokens": min(cfg.sampling.max_tokens,
                                                                          cfg.serving.max_tokens_cap)}
    return Ingress.options(name="tomtransfer-ingress").bind(
        apps["teacher"], apps["student"], serving, defaults, [str(p) for p in cfg.scenarios.packs], info, tracking)
