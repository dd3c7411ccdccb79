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


@contextmanager
def serving(cfg: ExperimentConfig, *, app_name: str = "tomtransfer", route_prefix: str = "/",
            log_to_driver: bool = False) -> Iterator[str]:
    """`serving.base_url`, or the serving app deployed on Ray for the duration of the block. Ray is stopped at
    the end only if this block started it (a sweep keeps its Ray between groups of cells)."""
    if cfg.serving.base_url:
        yield cfg.serving.base_url
        return
    import ray
    from ray import serve

    from services.teacher.serve_cli import start

    started_ray = not ray.is_initialized()
    say(f"[serve] deploying the serving app {app_name} (teacher + student)")
    try:
        yield start(cfg, app_name=app_name, route_prefix=route_prefix, log_to_driver=log_to_driver)
    finally:
        try:
            if started_ray:
                serve.shutdown()
            elif ray.is_initialized():
                serve.delete(app_name)
        finally:
            if started_ray:
                ray.shutdown()


def serving_api_key(cfg: ExperimentConfig) -> str | None:
    env = cfg.serving.auth_token_env
    return os.environ.get(env) if env else None
