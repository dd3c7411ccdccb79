"""`tomtransfer serve --config FILE`: start Ray (local, or the cluster in RAY_ADDRESS), deploy the serving
app, print its base URL, block until Ctrl-C / SIGTERM, then shut down cleanly.

Register in services/cli.py::

    @app.command()
    def serve(config: Path = typer.Option(..., "--config", "-c", exists=False)) -> None:
        \"\"\"Serve teacher and student on one OpenAI-compatible endpoint (Ray Serve).\"\"\"
        from tomtransfer.services.teacher.serve_cli import serve as run_serve
        run_serve(config)

Local runs bind `serving.host` (127.0.0.1 by default). A host other than loopback (127.0.0.0/8, ::1,
localhost) needs `serving.auth_token_env` (or, deliberately, `serving.allow_open: true`): otherwise the
command refuses in one line, exit 2, before anything starts. Ray itself listens on every interface of the
machine (it ignores the node IP setting): run it inside a private network namespace where that matters
(`scripts/in-netns tomtransfer serve --config FILE`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig, load_config
from tomtransfer.shared.errors import UserError

from tomtransfer.services.common.checks import check_models, check_secrets

# ray and the serving app (services.teacher.app: ray, torch) are imported where they are used: the checks before
# anything starts (and `tomtransfer` itself, which imports this module) need neither.

APP_NAME = "tomtransfer"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(cfg) -> None:
    """An open app (no bearer token) binds loopback only, unless serving.allow_open says otherwise."""
    s = cfg.serving
    if not is_loopback(s.host) and not s.auth_token_env and not s.allow_open:
        raise UserError(f"serving.host {s.host} is not a loopback address and serving.auth_token_env is not set: "
                        f"anyone who reaches port {s.port} could use the models; set serving.auth_token_env (a "
                        f"bearer token) or serving.allow_open: true")


def preflight(cfg) -> None:
    """Fail fast, before Ray starts: no open non-loopback bind, models resolvable (aliases fetched here), env vars
    present."""
    check_bind(cfg)
    check_models(cfg)
    check_secrets(cfg)


def start(config, *, ray_address: str | None = None, num_cpus: int | None = None, wait_ready: bool = True,
          app_name: str = APP_NAME, route_prefix: str = "/", log_to_driver: bool = False) -> str:
    """Start Ray (unless this process already joined one) + Serve and deploy the app for `config` (an
    ExperimentConfig, or a config file); returns the base URL (`http://host:port<prefix>/v1`). Does not block."""
    from ray import serve

    from tomtransfer.services.teacher.app import build_app

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    preflight(cfg)
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


def serve(config_path: str | Path) -> None:
    """Deploy, print the base URL, block until Ctrl-C or SIGTERM, then shut down Serve and Ray."""
    preflight(load_config(config_path))  # a bad config or input fails here, in one line, before anything starts
    stop_event = threading.Event()
    previous: dict = {}
    try:
        url = start(config_path)  # Ctrl-C while starting raises KeyboardInterrupt; `finally` cleans up
        previous = {s: signal.signal(s, lambda *_: stop_event.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        print(url, flush=True)
        _say(f"serving teacher and student on {url} (models: teacher, student, student:<adapter>); Ctrl-C stops")
        while not stop_event.wait(1.0):
            pass
        _say("stopping ...")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        stop()
        _say("stopped")


if __name__ == "__main__":  # python -m services.teacher.serve_cli CONFIG
    if len(sys.argv) != 2:
        sys.exit("usage: python -m services.teacher.serve_cli CONFIG")
    try:
        serve(sys.argv[1])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
