"""The workflows, composed from the stages: `run` (the whole experiment), and `generate`, `train`, `evaluate` alone.

`tomtransfer run --config FILE` (and `make run` on the demo), in order:
  1. checks    bad input (models, secrets, scenarios) fails in one line before anything is written
  2. tracking  `mlflow.tracking_uri`, or a local MLflow server for the duration of the run
  3. serving   `serving.base_url`, or Ray + the serving app (teacher and student), deployed when a stage first
               needs it (a finished experiment run again starts neither Ray nor a model)
  4. run       one MLflow parent run per experiment (its id kept in `<run_dir>/mlflow_run_id`)
  5. stages    generate -> train (+ the placebo control under `training.placebo`) -> serve the adapter(s) ->
               evaluate (`stages`), each reused only when its inputs are unchanged (`fingerprint`), their MLflow
               runs filed under the parent
Limits: one experiment at a time per run folder; a local MLflow server and Ray stop when the run ends (reopen the
store with `make mlflow-ui`).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.samples import adapter_name

from tomtransfer.services.collector.jobs import base_url as endpoint
from tomtransfer.services.common.checks import check_endpoint, serving_api_key
from tomtransfer.services.common.console import say
from tomtransfer.services.evaluator.tracking import use_experiment
from tomtransfer.services.pipeline import stages
from tomtransfer.services.pipeline.preflight import preflight
from tomtransfer.services.pipeline.resources import LocalApp, local_app, serving, tracking, with_tracking
from tomtransfer.services.pipeline.stages import Context

# mlflow and services.trainer.train (torch) are imported where they are used: slow imports that the checks before
# anything starts do not need.


@dataclass
class RunResult:
    config: ExperimentConfig
    tracking_uri: str
    mlflow_run_id: str
    experiment_id: str
    generated: stages.Generated
    trained: stages.Trained
    evaluated: stages.Evaluated
    timings: dict = field(default_factory=dict)
    trained_placebo: stages.Trained | None = None  # `training.placebo`: the placebo control's adapter


def run(cfg: ExperimentConfig, *, tags: dict | None = None) -> RunResult:
    """The whole experiment: start what is not configured (the serving app when a stage first needs it), then
    `run_stages`."""
    preflight(cfg, "run")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        uri = stack.enter_context(tracking(cfg))
        cfg = with_tracking(cfg, uri)
        app = stack.enter_context(local_app(cfg))
        res = run_stages(cfg, Context(tracking_uri=uri, url=cfg.serving.base_url, api_key=serving_api_key(cfg)),
                         tags=tags, app=app)
    res.timings = {**res.timings, "total_s": time.perf_counter() - t0}
    return res


def run_stages(cfg: ExperimentConfig, ctx: Context, *, tags: dict | None = None,
               app: LocalApp | None = None) -> RunResult:
    """generate -> train (and the placebo control under `training.placebo`) -> serve the adapter(s) -> evaluate
    under the experiment's parent MLflow run, against a running app (`ctx.url`: every sweep cell) or `app`, the
    local one, deployed when a stage first needs it: a stage reused from an earlier run with the same inputs needs
    none, so a finished experiment run again starts no model. The local app steps aside while training when the
    training workers cannot fit beside its replicas (`serving.release_for_training`)."""
    import mlflow

    timings: dict[str, float] = {}

    def served(ctx: Context) -> Context:  # ctx with the app's URL, the local app deployed first where it is down
        if app is None:
            return ctx
        if app.url is None:
            t = time.perf_counter()
            app.ensure()
            timings["serve_start_s" if app.deploys == 1 else "serve_restart_s"] = time.perf_counter() - t
        return Context(**{**ctx.__dict__, "url": app.url})

    parent = _parent_run(cfg, ctx.tracking_uri, tags)
    with parent:
        ctx = Context(**{**ctx.__dict__, "parent_run_id": parent.info.run_id})
        mlflow.log_params({"teacher": cfg.models.teacher.model, "student": cfg.models.student.model,
                           "teacher_engine": cfg.models.teacher.engine, "student_engine": cfg.models.student.engine,
                           "estimator": cfg.evaluate.estimator, "protocol": cfg.evaluate.protocol,
                           "rate": cfg.evaluate.rate})
        if not stages.generate_done(cfg):
            ctx = served(ctx)
        t = time.perf_counter()
        gen = stages.generate(cfg, ctx)
        timings["generate_s"] = time.perf_counter() - t
        if cfg.training.objective != "sft":  # the teacher's exact calls need the app, before it steps aside
            if not stages.soft_labels_ready(cfg):
                ctx = served(ctx)
            t = time.perf_counter()
            stages.soft_label_set(cfg, ctx)
            timings["soft_labels_s"] = time.perf_counter() - t
        mlflow.log_metrics(stages.teacher_cost(cfg))  # tokens / forward passes asked of the teacher, for sweeps
        t = time.perf_counter()
        from tomtransfer.services.trainer.train import worker_resources

        need = worker_resources(cfg.training)
        to_train = not stages.train_done(cfg, gen.dataset)
        if app is not None and to_train:
            app.ray_up()  # training shares the cluster the app deploys on later (and fails first if it cannot fit)
        stepped_aside = (app is not None and cfg.serving.release_for_training and to_train and
                         app.in_the_way_of(need))
        if stepped_aside:
            held = app.held()
            say(f"[serve] the serving app steps aside while training (the workers need {need['CPU']:g} CPU, "
                f"{need['GPU']:g} GPU; its replicas hold {held['CPU']:g} CPU, {held['GPU']:g} GPU)")
            app.step_aside(need)
        tr = stages.train(cfg, ctx, gen.dataset)
        timings["train_s"] = time.perf_counter() - t
        trp = None
        if cfg.training.placebo:  # the same recipe on the completions permuted across scenarios
            t = time.perf_counter()
            trp = stages.train_placebo(cfg, ctx, gen.dataset)
            timings["train_placebo_s"] = time.perf_counter() - t
        mlflow.log_artifacts(tr.adapter_dir, "adapter")
        mlflow.set_tags({"tomtransfer.adapter_uri": tr.adapter_uri or "",
                         "tomtransfer.adapter_name": cfg.training.adapter_name})
        if trp is not None:
            mlflow.log_artifacts(trp.adapter_dir, "adapter_placebo")
            mlflow.set_tags({"tomtransfer.placebo_adapter_uri": trp.adapter_uri or "",
                             "tomtransfer.placebo_adapter_name": adapter_name("student_placebo",
                                                                               cfg.training.adapter_name)})
        adapters = {"student_finetuned": stages.adapter_identity(tr.adapter_dir),
                    "student_placebo": stages.adapter_identity(trp.adapter_dir) if trp is not None else None}
        if not stages.evaluate_done(cfg, adapters):  # rows to measure: the app, with the adapters on it
            if stepped_aside:
                say("[serve] deploying the serving app again for the evaluation")
            ctx = served(ctx)
            stages.serve_adapter(cfg, ctx, tr.adapter_dir)
            if trp is not None:
                stages.serve_adapter(cfg, ctx, trp.adapter_dir, role="student_placebo")
        t = time.perf_counter()
        ev = stages.evaluate(cfg, ctx, adapters["student_finetuned"], placebo_adapter=adapters["student_placebo"],
                             run_info={"experiment": cfg.name})
        timings["evaluate_s"] = time.perf_counter() - t
        mlflow.log_metrics({f"timing.{k}": v for k, v in timings.items()})
    return RunResult(config=cfg, tracking_uri=ctx.tracking_uri, mlflow_run_id=parent.info.run_id,
                     experiment_id=parent.info.experiment_id, generated=gen,
                     trained=tr, evaluated=ev, timings=timings, trained_placebo=trp)


def _parent_run(cfg: ExperimentConfig, tracking_uri: str, tags: dict | None):
    """Start (or resume) the experiment's MLflow run; returns the active run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    use_experiment(cfg.mlflow.experiment)  # marked as model training: the UI opens on the runs table
    id_file = cfg.run_dir / "mlflow_run_id"
    if id_file.is_file():
        try:
            return mlflow.start_run(run_id=id_file.read_text().strip())
        except MlflowException:
            pass  # the store was reset: start afresh
    run = mlflow.start_run(run_name=cfg.name, tags={"tomtransfer.stage": "run", **(tags or {})})
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.info.run_id + "\n")
    return run


# ------------------------------------------------------------------------------------------- one stage alone
def generate(cfg: ExperimentConfig, *, base_url: str | None = None, progress: bool | None = None) -> stages.Generated:
    """`tomtransfer generate`: the teacher dataset against a running app (`--base-url`, `serving.base_url`, or the
    address `serve` binds by default); logged to `mlflow.tracking_uri` when one is set."""
    preflight(cfg, "generate")
    ctx = Context(tracking_uri=cfg.mlflow.tracking_uri, url=endpoint(cfg, base_url), api_key=serving_api_key(cfg),
                  progress=progress)
    check_endpoint(cfg, ctx.url, ctx.api_key)  # before the sample store or an MLflow run exists
    gen = stages.generate(cfg, ctx)
    if cfg.training.objective != "sft":  # the train stage's second input, while the app is at hand
        stages.soft_label_set(cfg, ctx)
    return gen


def train(cfg: ExperimentConfig, *, dataset: str | Path | None = None, checkpoint_every: int = 0) -> stages.Trained:
    """`tomtransfer train`: LoRA on the training set `generate` made for this config (or `dataset`), then the placebo
    control under `training.placebo` (said on stderr); returns the real adapter's outcome."""
    if checkpoint_every < 0:
        raise UserError("--checkpoint-every must be >= 0")
    preflight(cfg, "train")  # an unknown student fails here, before MLflow or Ray start
    path = stages.training_set(cfg, dataset)
    # distribution objectives: built by generate/run (or now, against serving.base_url), or training.soft_labels
    stages.soft_label_set(cfg, Context(tracking_uri=None, url=cfg.serving.base_url, api_key=serving_api_key(cfg))
                         if cfg.serving.base_url else None)
    with tracking(cfg) as uri:
        cfg = with_tracking(cfg, uri)
        tr = stages.train(cfg, Context(tracking_uri=uri), path, checkpoint_every=checkpoint_every)
        if cfg.training.placebo:
            trp = stages.train_placebo(cfg, Context(tracking_uri=uri), path, checkpoint_every=checkpoint_every)
            say(f"[train] placebo adapter {trp.adapter_dir} ({trp.adapter_uri}), mlflow run {trp.run_id}"
                + (" (reused)" if trp.reused else ""))
        return tr


def evaluate(cfg: ExperimentConfig) -> tuple[str, stages.Evaluated]:
    """`tomtransfer evaluate`: the roles against a running app (`serving.base_url`) or one started here, in an
    MLflow run of its own (`stages.evaluate_run`). The fine-tuned student is the adapter `train` made with this
    config's inputs (or the one named in `serving.adapters`); the placebo student (student_placebo) likewise,
    `<adapter_name>-placebo`."""
    preflight(cfg, "evaluate")
    with ExitStack() as stack:
        uri = stack.enter_context(tracking(cfg))
        cfg = with_tracking(cfg, uri)
        url = stack.enter_context(serving(cfg))
        ctx = Context(tracking_uri=uri, url=url, api_key=serving_api_key(cfg))
        adapters: dict[str, dict | None] = {}
        for role in ("student_finetuned", "student_placebo"):
            if role not in cfg.evaluate.roles or cfg.serving.base_url:
                continue
            adapter_dir = stages.trained_adapter(cfg, placebo=role == "student_placebo")
            if adapter_dir is None and adapter_name(role, cfg.training.adapter_name) not in cfg.serving.adapters:
                raise UserError(f"no adapter for {role}: train first (no adapter trained with this config's "
                                "inputs) or name it in serving.adapters")
            if adapter_dir is not None:
                adapters[role] = stages.serve_adapter(cfg, ctx, adapter_dir, role=role)
        with stages.evaluate_run(cfg, ctx) as run_id:
            return run_id, stages.evaluate(cfg, ctx, adapters.get("student_finetuned"),
                                           placebo_adapter=adapters.get("student_placebo"))
