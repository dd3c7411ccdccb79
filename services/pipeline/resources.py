"""What a stage runs against: the MLflow tracking server and the serving app, each either configured (used as is)
or started here for the duration of a `with` block."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tomtransfer.shared.config import ExperimentConfig

from tomtransfer.services.common.console import say
from tomtransfer.services.common.mlflow_server import MlflowServer
from tomtransfer.services.evaluator.tracking import experiment_url
from tomtransfer.services.teacher.serving import check_fits, init_ray, start

# mlflow and ray are imported where they are used: slow imports that the stages' checks (and the tests of the
# links below) do not need.


UI_URL = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves a local store once the command has ended
# the store `make mlflow-ui` opens by default: the repository's runs/mlflow (MLFLOW_STORE=... for another)
UI_STORE = Path(__file__).resolve().parents[2] / "runs" / "mlflow"


@contextmanager
def tracking(cfg: ExperimentConfig) -> Iterator[str]:
    """`mlflow.tracking_uri`, or a local MLflow server (sqlite + artifacts under `<output_dir>/mlflow`, 127.0.0.1)
    for the duration of the block - the store `make mlflow-ui` opens afterwards. The local server's port dies with
    the block, so MLflow's own "View run ... at" lines are suppressed and, at the end (also after a failure), each
    run the block started is listed with its address under `make mlflow-ui`."""
    if cfg.mlflow.tracking_uri:
        yield cfg.mlflow.tracking_uri
        return
    root = Path(cfg.output_dir) / "mlflow"
    say(f"[tracking] starting a local MLflow server (store {root})")
    quiet = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(quiet)
    os.environ[quiet] = "true"  # inherited by the Ray workers and processes started inside the block
    started_ms = int(time.time() * 1000)
    try:
        with MlflowServer(root) as server:
            try:
                yield server.uri
            finally:
                _say_ui_links(server.uri, root, started_ms)
    finally:
        if before is None:
            os.environ.pop(quiet, None)
        else:
            os.environ[quiet] = before


def ui_address(cfg: ExperimentConfig, url: str, uri: str) -> str:
    """`url` (an address on the tracking server `uri`) as it works after the command: unchanged for a configured
    server, else on the `make mlflow-ui` server (the local one stops with the command)."""
    if cfg.mlflow.tracking_uri or not url.startswith(uri.rstrip("/")):
        return url
    return UI_URL + url[len(uri.rstrip("/")):] + "  (make mlflow-ui)"


def _say_ui_links(uri: str, root: Path, since_ms: int) -> None:
    """The runs started since `since_ms` on the local server at `uri`, as addresses under `make mlflow-ui`."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                              f"attributes.start_time >= {since_ms}",
                                              order_by=["attributes.start_time ASC"], max_results=200)]
        if not runs:
            return
        make = "make mlflow-ui"
        if root.resolve() != UI_STORE:
            make += f" MLFLOW_STORE={root.resolve()}"
        say(f"[mlflow] the local server stops with this command; open its runs after it: {make}, then")
        for exp_id in dict.fromkeys(r.info.experiment_id for r in runs):
            say(f"[mlflow]   experiment {client.get_experiment(exp_id).name}: "
                f"{experiment_url(UI_URL, exp_id, client=client)}")
        for r in runs:
            say(f"[mlflow]   run {r.info.run_name}: "
                f"{UI_URL}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}")
    except Exception as e:  # noqa: BLE001 - the links are a convenience; never fail or mask the command for them
        say(f"[mlflow] (could not list the runs for `make mlflow-ui`: {e})")


def with_tracking(cfg: ExperimentConfig, uri: str) -> ExperimentConfig:
    """The config the stages see: the tracking URI they log to filled in (the serving app loads adapters from it)."""
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


class LocalApp:
    """The serving app this process deploys on Ray when a stage first needs it (`ensure`): a rerun whose stages are
    all reused starts neither Ray nor a model. It can step aside for a stage that needs its resources; the next
    `ensure` deploys it again."""

    def __init__(self, cfg: ExperimentConfig, app_name: str, route_prefix: str, log_to_driver: bool):
        self.cfg, self.app_name, self.route_prefix, self.log_to_driver = cfg, app_name, route_prefix, log_to_driver
        self.url: str | None = None  # while deployed
        self.deploys = 0
        self.started_ray = False  # the first deploy started Ray: stopped at the end of `local_app`

    def ensure(self) -> str:
        """The app's base URL, deploying it first where it is not up (the first call, or after `step_aside`)."""
        if self.url is None:
            import ray

            if self.deploys == 0:
                self.started_ray = self.started_ray or not ray.is_initialized()
                say(f"[serve] deploying the serving app {self.app_name} (teacher + student)")
            self.url = start(self.cfg, app_name=self.app_name, route_prefix=self.route_prefix,
                             log_to_driver=self.log_to_driver)
            self.deploys += 1
        return self.url

    def ray_up(self) -> None:
        """Start Ray now, as the app's first deploy would, and check that its replicas can fit there: a stage that
        runs before that deploy (training) shares the cluster, and an app that can never fit fails before it."""
        if self.deploys == 0 and not self.started_ray:
            self.started_ray = init_ray(log_to_driver=self.log_to_driver)
            if not os.environ.get("RAY_ADDRESS"):
                check_fits(self.cfg)

    def held(self) -> dict[str, float]:
        """CPUs and GPUs the app's model replicas reserve."""
        specs = (self.cfg.models.teacher, self.cfg.models.student)
        return {"CPU": sum(m.num_replicas * m.num_cpus for m in specs),
                "GPU": sum(m.num_replicas * m.num_gpus for m in specs)}

    def in_the_way_of(self, need: dict[str, float]) -> bool:
        """True when the app is up and `need` does not fit in the free resources now but would without its
        replicas."""
        if self.url is None:
            return False
        import ray

        free, held = ray.available_resources(), self.held()
        short = [k for k, v in need.items() if v > free.get(k, 0.0) + 1e-9]
        return bool(short) and all(need[k] <= free.get(k, 0.0) + held[k] + 1e-9 for k in short)

    def step_aside(self, need: dict[str, float], timeout_s: float = 60.0) -> None:
        """Delete the app and wait until Ray has the resources back."""
        import ray
        from ray import serve

        serve.delete(self.app_name)
        self.url = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            free = ray.available_resources()
            if all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items()):
                return
            time.sleep(0.5)


@contextmanager
def local_app(cfg: ExperimentConfig, *, app_name: str = "tomtransfer", route_prefix: str = "/",
              log_to_driver: bool = False) -> Iterator[LocalApp | None]:
    """The serving app on Ray for the duration of the block, deployed when first asked for (`LocalApp.ensure`), or
    None when `serving.base_url` names one already running. Ray is stopped at the end only if the app's first
    deploy started it (a sweep keeps its Ray between groups of cells)."""
    if cfg.serving.base_url:
        yield None
        return
    app = LocalApp(cfg, app_name, route_prefix, log_to_driver)
    try:
        yield app
    finally:
        if app.deploys or app.started_ray:  # (`ray_up`, or a first deploy that failed, may have started Ray)
            import ray
            from ray import serve

            try:
                if app.deploys and app.started_ray:
                    serve.shutdown()
                elif app.deploys and ray.is_initialized():
                    serve.delete(app_name)
            finally:
                if app.started_ray:
                    ray.shutdown()


@contextmanager
def serving(cfg: ExperimentConfig, **kwargs) -> Iterator[str]:
    """The serving app's base URL: `serving.base_url`, or the app deployed now for the duration of the block."""
    with local_app(cfg, **kwargs) as app:
        yield app.ensure() if app is not None else cfg.serving.base_url
