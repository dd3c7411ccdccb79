"""What a stage runs against: the MLflow tracking server and the serving app, each either configured (used as is)
or started here for the duration of a `with` block."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shared.config import ExperimentConfig


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def tracking(cfg: ExperimentConfig) -> Iterator[str]:
    """`mlflow.tracking_uri`, or a local MLflow server (sqlite + artifacts under `<output_dir>/mlflow`, 127.0.0.1)
    for the duration of the block - the store `make mlflow-ui` opens afterwards."""
    if cfg.mlflow.tracking_uri:
        yield cfg.mlflow.tracking_uri
        return
    from services.common.mlflow_server import MlflowServer

    root = Path(cfg.output_dir) / "mlflow"
    say(f"[tracking] starting a local MLflow server (store {root})")
    with MlflowServer(root) as server:
        yield server.uri


def with_tracking(cfg: ExperimentConfig, uri: str) -> ExperimentConfig:
    """The config the stages see: the tracking URI they log to filled in (the serving app loads adapters from it)."""
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


class LocalApp:
    """The serving app this process deployed on Ray; it can step aside for a stage that needs its resources."""

    def __init__(self, cfg: ExperimentConfig, app_name: str, route_prefix: str, log_to_driver: bool):
        self.cfg, self.app_name, self.route_prefix, self.log_to_driver = cfg, app_name, route_prefix, log_to_driver
        self.url: str | None = None

    def deploy(self) -> str:
        from services.teacher.serve_cli import start

        self.url = start(self.cfg, app_name=self.app_name, route_prefix=self.route_prefix,
                         log_to_driver=self.log_to_driver)
        return self.url

    def held(self) -> dict[str, float]:
        """CPUs and GPUs the app's model replicas reserve."""
        specs = (self.cfg.models.teacher, self.cfg.models.student)
        return {"CPU": sum(m.num_replicas * m.num_cpus for m in specs),
                "GPU": sum(m.num_replicas * m.num_gpus for m in specs)}

    def in_the_way_of(self, need: dict[str, float]) -> bool:
        """True when `need` does not fit in the free resources now but would without the app's replicas."""
        import ray

        free, held = ray.available_resources(), self.held()
        short = [k for k, v in need.items() if v > free.get(k, 0.0) + 1e-9]
        return bool(short) and all(need[k] <= free.get(k, 0.0) + held[k] + 1e-9 for k in short)

    def step_aside(self, need: dict[str, float], timeout_s: float = 60.0) -> None:
        """Delete the app and wait until Ray has the resources back."""
        import time

        import ray
        from ray import serve

        serve.delete(self.app_name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            free = ray.available_resources()
            if all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items()):
                return
            time.sleep(0.5)


@contextmanager
def local_app(cfg: ExperimentConfig, *, app_name: str = "tomtransfer", route_prefix: str = "/",
              log_to_driver: bool = False) -> Iterator[LocalApp | None]:
    """The serving app deployed on Ray for the duration of the block, or None when `serving.base_url` names one
    already running. Ray is stopped at the end only if this block started it (a sweep keeps its Ray between groups
    of cells)."""
    if cfg.serving.base_url:
        yield None
        return
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    say(f"[serve] deploying the serving app {app_name} (teacher + student)")
    app = LocalApp(cfg, app_name, route_prefix, log_to_driver)
    try:
        app.deploy()
        yield app
    finally:
        try:
            if started_ray:
                serve.shutdown()
            elif ray.is_initialized():
                serve.delete(app_name)
        finally:
            if started_ray:
                ray.shutdown()


@contextmanager
def serving(cfg: ExperimentConfig, **kwargs) -> Iterator[str]:
    """The serving app's base URL: `serving.base_url`, or the app deployed for the duration of the block."""
    with local_app(cfg, **kwargs) as app:
        yield app.url if app is not None else cfg.serving.base_url


def serving_api_key(cfg: ExperimentConfig) -> str | None:
    env = cfg.serving.auth_token_env
    return os.environ.get(env) if env else None
