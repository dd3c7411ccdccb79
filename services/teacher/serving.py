"""The serving app on Ray: start Ray (local, or the cluster in RAY_ADDRESS) and Serve, deploy the app for a config,
wait until it answers, and stop it all again. `tomtransfer serve` (services/cli.py) and the pipeline's local app
(`services.pipeline.resources.LocalApp`) use it; so do tests and benchmarks.

The checks before anything starts are the command's (`services.pipeline.preflight`); `start` keeps one of them as
a guard of its own: an app without a bearer token binds loopback only (127.0.0.0/8, ::1, localhost) unless
`serving.allow_open: true` (`services.common.checks.check_bind`). Ray itself listens on every interface of the
machine (it ignores the node IP setting): run it inside a private network namespace where that matters
(`scripts/in-netns tomtransfer serve --config FILE`).
"""

from __future__ import annotations

import os
import time

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError

from tomtransfer.services.common.checks import check_bind, check_port

# ray and the serving app (services.teacher.app: ray, torch) are imported where they are used: the checks before
# anything starts (and `tomtransfer` itself) need neither.

APP_NAME = "tomtransfer"


def start(cfg: ExperimentConfig, *, ray_address: str | None = None, num_cpus: int | None = None,
          wait_ready: bool = True, app_name: str = APP_NAME, route_prefix: str = "/", log_to_driver: bool = False) -> str:
    """Start Ray (unless this process already joined one) + Serve and deploy the app for `cfg`; returns the base URL
    (`http://host:port<prefix>/v1`). Does not block."""
    from ray import serve

    from tomtransfer.services.teacher.app import build_app

    check_bind(cfg)  # guards of its own: never an open app on a non-loopback address,
    if not ray_address:
        check_port(cfg)  # nor one that shares a taken port (skipped where Ray is up or RAY_ADDRESS names a cluster)
    init_ray(ray_address, num_cpus=num_cpus, log_to_driver=log_to_driver)
    if not (ray_address or os.environ.get("RAY_ADDRESS")):
        check_fits(cfg)
    serve.start(http_options={"host": cfg.serving.host, "port": cfg.serving.port})
    serve.run(build_app({"config_data": cfg.model_dump(mode="json")}), name=app_name, route_prefix=route_prefix,
              blocking=False)
    host = cfg.serving.host if cfg.serving.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{cfg.serving.port}{route_prefix.rstrip('/')}/v1"
    if wait_ready:
        _wait_ready(url)
    return url


def check_fits(cfg) -> None:
    """A local cluster does not autoscale: replicas that cannot fit would leave Serve waiting until its timeout with
    no word (measured on 2 H200s with 2 x 1 + 0.1 GPUs asked for). Say so before deploying."""
    import ray

    total = ray.cluster_resources()
    specs = {role: getattr(cfg.models, role) for role in ("teacher", "student")}
    for res, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(m.num_replicas * getattr(m, attr) for m in specs.values())
        if need > total.get(res, 0.0) + 1e-9:
            parts = ", ".join(f"{r} {m.num_replicas} x {getattr(m, attr):g}" for r, m in specs.items())
            raise UserError(f"the serving replicas need {need:g} {res} ({parts}) and this Ray cluster has "
                            f"{total.get(res, 0.0):g}: lower models.<role>.{attr} or num_replicas")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Join the cluster in `address` / RAY_ADDRESS, or start a local one; False when Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    address = address if address is not None else os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    return True


def _wait_ready(url: str, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    health = url.rsplit("/v1", 1)[0] + "/health"
    while time.monotonic() < deadline:
        try:
            if httpx.get(health, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the serving app did not answer on {health} within {timeout:.0f} s")


def stop() -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():  # failed before Ray started (e.g. a bad config): serve.shutdown() would start it
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
