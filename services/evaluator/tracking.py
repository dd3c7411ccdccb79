"""Logging an evaluation to MLflow, under the active run, so runs compare in the UI.

What lands where (`log_evaluation`):

  params      the experiment config flattened with dots (`models.teacher.model`, `evaluate.samples`, ...);
              lists as JSON. A key the run already holds with the same value is fine; one it holds with
              another value is left alone and reported (MLflow params are immutable) - never an error.
  metrics     `EvaluationResult.flat_metrics()` (stable names, see services.evaluator.scoring), sent with
              `mlflow.log_metrics` in batches of at most 500
  tags        tomtransfer.stage = evaluate, tomtransfer.estimator, tomtransfer.samples
  experiment  marked as model training, its headline-metrics view widened (`mark_training_experiment`)
  figures/    PNGs            tables/   Table 1 (csv/md/tex), scenarios/rates/summary/pgg CSVs, evaluation.json
  report/     report.md, report.html (links ../figures/), report_standalone.html (figures embedded)
  samples/    the raw samples Parquet file(s) (folder structure kept) or `samples/exact.parquet`
  config/     config.yaml (the resolved config, what `report --run-id` reads back) [+ the original file]

`evaluate_and_log(...)` is the whole evaluate-stage tail: metrics -> figures, tables, report -> MLflow.

The experiment in the MLflow UI (`use_experiment`, `mark_training_experiment`, `experiment_url`):
  MLflow 3.x files every experiment under a "GenAI" or a "Model training" workflow. The 3.17 UI takes it from a
  per-browser switch (default GenAI: the overview with "Traces 0", runs filed as "Evaluation runs") or from the
  page address (`?workflowType=machine_learning`); later UIs follow the experiment tag `mlflow.experimentKind`.
  So the experiment gets the tag (`custom_model_development`, what the UI's own "Machine learning" choice writes)
  and a saved runs-table view whose columns are the headline metrics (`headline_metrics`: improvement per
  family, PGG improvement, valid shares per role); `experiment_url` opens the runs table with both.

Sweeps (`start_sweep`, `Sweep.child_tags`, `summarize_sweep`): one parent run, one child run per cell (the cell's
own run, tagged with `Sweep.child_tags`), every child logging the same metric names through `log_evaluation`, so
MLflow's compare view lines them up; the parent gets the summary table and the spread of the headline metrics.
mlflow is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import yaml

from tomtransfer.shared.config import ALL_FAMILIES, ExperimentConfig
from tomtransfer.shared.samples import ROLES

from tomtransfer.services.evaluator.scoring import EXACT_PARQUET, EvaluationResult, compute
from tomtransfer.services.evaluator.report import Outputs, write_outputs

log = logging.getLogger(__name__)

METRIC_BATCH = 500  # MLflow's log_batch takes up to 1000 metrics; stay well under
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (characters)
CONFIG_YAML = "config.yaml"


# ------------------------------------------------------------------------------------------ params
def config_dict(config: Any) -> dict:
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: string value}; nested mappings are flattened, lists and None become JSON."""
    out: dict[str, str] = {}

    def walk(d: Mapping, pre: str) -> None:
        for k, v in d.items():
            key = f"{pre}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, key + ".")
            elif isinstance(v, (list, tuple, Mapping)) or v is None:
                out[key] = json.dumps(v, default=str)
            else:
                out[key] = str(v)
            if len(out.get(key, "")) > PARAM_VALUE_MAX:
                out[key] = out[key][: PARAM_VALUE_MAX - 3] + "..."

    walk(config_dict(config), prefix)
    return out


def log_params(params: Mapping[str, str]) -> list[str]:
    """Log params the active run does not hold yet; returns the keys it holds with a *different* value."""
    import mlflow

    run = _active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    new = {k: v for k, v in params.items() if k not in existing}
    conflicts = [k for k, v in params.items() if k in existing and existing[k] != v]
    if conflicts:
        log.warning("MLflow run %s already holds other values for %d param(s), kept: %s", run.info.run_id,
                    len(conflicts), ", ".join(conflicts[:10]))
    items = list(new.items())
    for i in range(0, len(items), 100):  # log_batch: at most 100 params per call
        mlflow.log_params(dict(items[i:i + 100]))
    return conflicts


def log_metrics(metrics: Mapping[str, float], step: int | None = None, batch: int = METRIC_BATCH) -> int:
    """`mlflow.log_metrics` in batches; returns how many metrics were logged."""
    import mlflow

    items = list(metrics.items())
    for i in range(0, len(items), batch):
        mlflow.log_metrics(dict(items[i:i + batch]), step=step)
    return len(items)


def _active_run():
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call inside `with mlflow.start_run():`")
    return run


# ------------------------------------------------------------------------------------------ artifacts
def _log_samples(samples: Any, exact: Any) -> list[str]:
    """Raw results under samples/: Parquet files as they are (a folder's *.parquet keep their sub-paths),
    an in-memory table as samples.parquet, exact results always as samples/exact.parquet."""
    import mlflow

    logged: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tt-eval-") as tmp:
        if isinstance(samples, pd.DataFrame):
            p = Path(tmp) / "samples.parquet"
            samples.to_parquet(p, index=False)
            mlflow.log_artifact(str(p), "samples")
            logged.append("samples/samples.parquet")
        elif samples is not None:
            for item in [samples] if isinstance(samples, (str, Path)) else list(samples):
                item = Path(item)
                files = sorted(item.rglob("*.parquet")) if item.is_dir() else [item]
                for f in files:
                    rel = f.relative_to(item).parent.as_posix() if item.is_dir() else "."
                    dest = "samples" if rel in (".", "") else f"samples/{rel}"
                    mlflow.log_artifact(str(f), dest)
                    logged.append(f"{dest}/{f.name}")
        if exact is not None:
            p = Path(tmp) / EXACT_PARQUET
            if isinstance(exact, pd.DataFrame):
                exact.to_parquet(p, index=False)
            else:
                src = Path(exact)
                shutil.copyfile(src / EXACT_PARQUET if src.is_dir() else src, p)
            mlflow.log_artifact(str(p), "samples")
            logged.append(f"samples/{EXACT_PARQUET}")
    return logged


def _log_config(config: Any, config_path: str | Path | None) -> None:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="tt-cfg-") as tmp:
        p = Path(tmp) / CONFIG_YAML
        p.write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
        mlflow.log_artifact(str(p), "config")
        if config_path is not None and Path(config_path).is_file() and Path(config_path).name != CONFIG_YAML:
            mlflow.log_artifact(str(config_path), "config")


def log_evaluation(
    result: EvaluationResult,
    outputs: Outputs,
    *,
    config: ExperimentConfig | None = None,
    config_path: str | Path | None = None,
    samples: Any = None,
    exact: Any = None,
    log_params_too: bool = True,
) -> dict:
    """Log params, metrics, tags, figures, tables, report, raw results and config to the active run."""
    import mlflow

    run = _active_run()
    summary: dict = {"run_id": run.info.run_id}
    if config is not None and log_params_too:
        params = flatten_params(config)
        if result.protocol:
            params["evaluate.protocol_line"] = result.protocol
        for role in result.roles:
            params[f"evaluate.instruction.{role}"] = config.evaluate.instruction_for(role)
            params[f"evaluate.estimator.{role}"] = config.evaluate.estimator_for(role)
        summary["param_conflicts"] = log_params(params)
    flat = result.flat_metrics()
    summary["metrics"] = log_metrics(flat)
    mark_training_experiment(run.info.experiment_id, headline_metrics(flat))
    mlflow.set_tags({"tomtransfer.stage": "evaluate", "tomtransfer.estimator": result.estimator,
                     "tomtransfer.samples": str(result.samples), "tomtransfer.rate": result.rate_basis})
    for sub in ("figures", "tables", "report"):
        d = outputs.root / sub
        if d.is_dir() and any(d.iterdir()):
            mlflow.log_artifacts(str(d), sub)
    summary["samples"] = _log_samples(samples, exact)
    if config is not None:
        _log_config(config, config_path)
    return summary


# ------------------------------------------------------------------------------------------ the tail
def evaluate_and_log(
    *,
    out_dir: str | Path,
    config: ExperimentConfig | None = None,
    config_path: str | Path | None = None,
    samples: Any = None,
    exact: Any = None,
    expected_samples: int | None = None,
    effective_n: int | None = None,
    n_resamples: int | None = None,
    log: bool = True,
    run_info: Mapping[str, str] | None = None,
) -> tuple[EvaluationResult, Outputs]:
    """Metrics from sampled or exact results, figures/tables/report under `out_dir`, then (if `log` and a run
    is active) everything to MLflow. Settings default from the config: `evaluate.samples` (N asserted for
    sampled results, effective n for exact ones) and `evaluate.bootstrap`."""
    import mlflow

    settings: dict = {"effective_n": effective_n, "n_resamples": n_resamples}
    if config is not None:
        ev = config.evaluate
        if samples is not None and expected_samples is None:
            expected_samples = ev.samples
        settings = {"effective_n": effective_n or ev.exact_n or ev.samples, "rate": ev.rate,
                    "min_valid_share": ev.min_valid_share, "protocol": config.protocol_line(),
                    "n_resamples": n_resamples or ev.bootstrap}
    # without a config (or for what it leaves unset): the evaluator's own defaults
    result = compute(samples=samples, exact=exact, expected_samples=expected_samples,
                     **{k: v for k, v in settings.items() if v is not None})
    info = dict(run_info or {})
    active = mlflow.active_run() if log else None
    if active is not None:
        info.setdefault("MLflow run", active.info.run_id)
    outputs = write_outputs(result, out_dir, config=config, run_info=info)
    if active is not None:
        log_evaluation(result, outputs, config=config, config_path=config_path, samples=samples, exact=exact)
    return result, outputs



# ------------------------------------------------------------------------------------------ the experiment page
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # what the UI writes when a person picks "Machine learning"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # one experiment tag per saved runs-table view (MLflow >= 3.x UI)
HEADLINE_VIEW = "tomtransfer-headline"
HEADLINE_VIEW_NAME = "Headline metrics"
ML_WORKFLOW = "machine_learning"


def headline_metrics(names: Iterable[str]) -> list[str]:
    """Of `names`, the metrics to compare runs by, in reading order: the mean improvement per family (then all
    families together), the PGG improvement, then each role's mean valid share per family."""
    present = set(names)
    families = [*ALL_FAMILIES, "all"]
    wanted = [f"improvement_mean.{f}" for f in families] + ["pgg.improvement"]
    wanted += [f"valid_share_mean.{r}.{f}" for r in ROLES for f in families]
    return [m for m in wanted if m in present]


def metric_column(metric: str) -> str:
    """The runs table's id for a metric's column."""
    return f"metrics.`{metric}`"


def param_column(param: str) -> str:
    return f"params.`{param}`"


def columns_state(columns: Mapping[str, str]) -> dict:
    """The runs-page state that shows `columns` ({column id: its name}) in this order, each wide enough for its
    name (the default width cuts "improvement_mean.oos_context" to "improvement_n...")."""
    return {"selectedColumns": list(columns), "columnOrder": list(columns),
            "columnWidths": {c: 7 * len(name) + 32 for c, name in columns.items()}}


def view_metrics(tag_value: str | None) -> list[str]:
    """The metric columns of a saved view we wrote (empty for none, or for a view in another format)."""
    try:
        cols = json.loads(json.loads(tag_value)["state"])["selectedColumns"]
    except (TypeError, ValueError, KeyError):
        return []
    return [c[len("metrics.`"):-1] for c in cols if c.startswith("metrics.`") and c.endswith("`")]


def save_view(experiment_id: str, key: str, name: str, state: Mapping[str, Any], *, client: Any) -> None:
    """A saved view of the experiment's runs table, listed under "Views" and opened by `?viewStateShareKey=key`.
    `state`: the runs page's state to apply (`selectedColumns`, `searchFilter`, ...); the rest stays default."""
    tag = VIEW_TAG_PREFIX + key
    old = client.get_experiment(experiment_id).tags.get(tag)
    try:
        created = json.loads(old)["createdAt"]
    except (TypeError, ValueError, KeyError):
        created = int(time.time() * 1000)
    # The UI's saved-view envelope: {name, createdAt, updatedAt, state}; `state` is JSON inside a string.
    client.set_experiment_tag(experiment_id, tag, json.dumps({
        "name": name, "createdAt": created, "updatedAt": int(time.time() * 1000), "state": json.dumps(dict(state))}))


def mark_training_experiment(experiment_id: str, headline: Iterable[str] = (), *, client: Any = None) -> None:
    """Tag the experiment as model training (runs table, not the GenAI overview); with `headline` metric names,
    save - or widen - its "Headline metrics" view of the runs table. Idempotent."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    if tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    old = view_metrics(tags.get(VIEW_TAG_PREFIX + HEADLINE_VIEW))
    metrics = old + [m for m in headline if m not in old]
    if metrics and metrics != old:
        save_view(experiment_id, HEADLINE_VIEW, HEADLINE_VIEW_NAME,
                  columns_state({metric_column(m): m for m in metrics}), client=client)


def use_experiment(name: str) -> str:
    """`mlflow.set_experiment(name)`, marked as a model-training experiment; returns its id."""
    import mlflow

    exp = mlflow.set_experiment(name)
    mark_training_experiment(exp.experiment_id)
    return exp.experiment_id


def experiment_url(tracking_uri: str, experiment_id: str, *, view: str | None = HEADLINE_VIEW,
                   client: Any = None) -> str:
    """The experiment's runs table in the MLflow UI, in the model-training workflow, with the saved `view` when
    the experiment has it (MLflow 3.17 reads the workflow from the address, not from the experiment's tag)."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri)
    query = f"workflowType={ML_WORKFLOW}"
    if view and VIEW_TAG_PREFIX + view in client.get_experiment(experiment_id).tags:
        query += f"&viewStateShareKey={view}"
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


# ------------------------------------------------------------------------------------------ sweeps
SWEEP_PARENT_TAG = "tomtransfer.sweep_parent"
CELL_TAG = "tomtransfer.cell"
SUMMARY_JSON = "sweep_summary.json"
SUMMARY_CSV = "sweep_summary.csv"
VIEW_PARAMS = 20  # differing params shown in the sweep's view (its tag must stay under MLflow's 20,000 characters)


@dataclass(frozen=True)
class Sweep:
    """A sweep's parent run. Each cell is a child run that carries `child_tags(cell)` (any process may start it:
    only the ids travel) and logs its evaluation with `log_evaluation`, so every child has the same metric names."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def child_tags(self, cell: str) -> dict[str, str]:
        return {"mlflow.parentRunId": self.run_id, SWEEP_PARENT_TAG: self.run_id, CELL_TAG: cell}

    def children(self) -> dict[str, Any]:
        """{cell: its newest child run}."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        out: dict[str, Any] = {}
        token = None
        while True:
            page = client.search_runs([self.experiment_id], f"tags.`{SWEEP_PARENT_TAG}` = '{self.run_id}'",
                                      order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                out.setdefault(run.data.tags.get(CELL_TAG, run.info.run_id), run)
            token = page.token
            if not token:
                return out

    @property
    def view(self) -> str:
        """The key of the sweep's saved runs-table view: its cells side by side (`summarize_sweep` saves it)."""
        return f"sweep-{self.run_id}"

    def url(self) -> str:
        """The cells side by side in the runs table, the differing params and headline metrics as columns."""
        return experiment_url(self.tracking_uri, self.experiment_id, view=self.view)

    def finished(self, cell: str):
        """The cell's child run if it finished, else None (what a rerun skips)."""
        run = self.children().get(cell)
        return run if run is not None and run.info.status == "FINISHED" else None


def start_sweep(tracking_uri: str, experiment: str, name: str, *, params: Mapping[str, Any] | None = None,
                resume_run_id: str | None = None) -> Sweep:
    """The sweep's parent run (RUNNING): `resume_run_id`'s when that run still exists in the experiment, else a
    new one with `params` (non-strings as JSON). The experiment is marked as model training."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    mark_training_experiment(exp_id, client=client)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except MlflowException:
            run = None  # a reset store: start a new parent
        if run is not None and run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active":
            client.update_run(run.info.run_id, status="RUNNING")
            return Sweep(tracking_uri, exp_id, run.info.run_id)
    run = client.create_run(exp_id, run_name=name, tags={"tomtransfer.stage": "sweep"})
    items = [Param(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):  # log_batch: at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return Sweep(tracking_uri, exp_id, run.info.run_id)


def summarize_sweep(sweep: Sweep, cells: Sequence[str] | None = None, *, metrics: Sequence[str] | None = None,
                    end: bool = True) -> list[dict]:
    """One row per cell (`cells` in that order, else every child): cell, run id, status, the params that differ
    between cells, the headline metrics (or `metrics`). Logged to the parent as sweep_summary.json/.csv, with
    `sweep.cells`, `sweep.cells_finished` and `sweep.{min,mean,max}.<metric>` over the finished cells, and the
    sweep's runs-table view (`Sweep.url`) is saved; with `end`, the parent is closed FINISHED when every cell
    finished, else FAILED."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    children = sweep.children()
    order = list(cells) if cells is not None else sorted(children)
    names = list(metrics) if metrics is not None else headline_metrics(
        {k for r in children.values() for k in r.data.metrics})
    keys = sorted({k for r in children.values() for k in r.data.params})
    varying = [k for k in keys if len({r.data.params.get(k) for r in children.values()}) > 1]
    rows = []
    for cell in order:
        run = children.get(cell)
        row = {"cell": cell, "run_id": run.info.run_id if run else None,
               "status": run.info.status if run else "MISSING"}
        row |= {k: run.data.params.get(k) if run else None for k in varying}
        row |= {m: run.data.metrics.get(m) if run else None for m in names}
        rows.append(row)
    finished = [r for r in rows if r["status"] == "FINISHED"]
    now = int(time.time() * 1000)
    summary = {"sweep.cells": float(len(rows)), "sweep.cells_finished": float(len(finished))}
    for m in names:
        values = [r[m] for r in finished if r[m] is not None]
        if values:
            summary |= {f"sweep.min.{m}": min(values), f"sweep.mean.{m}": sum(values) / len(values),
                        f"sweep.max.{m}": max(values)}
    items = [Metric(k, float(v), now, 0) for k, v in summary.items()]
    for i in range(0, len(items), METRIC_BATCH):
        client.log_batch(sweep.run_id, metrics=items[i:i + METRIC_BATCH])
    client.log_dict(sweep.run_id, rows, SUMMARY_JSON)
    client.log_text(sweep.run_id, pd.DataFrame(rows).to_csv(index=False), SUMMARY_CSV)
    mark_training_experiment(sweep.experiment_id, names, client=client)
    save_view(sweep.experiment_id, sweep.view, f"Sweep {client.get_run(sweep.run_id).info.run_name}",
              {"searchFilter": f"tags.`{SWEEP_PARENT_TAG}` = '{sweep.run_id}'",
               **columns_state({param_column(k): k for k in varying[:VIEW_PARAMS]}
                               | {metric_column(m): m for m in names}),
               # grouped by the sweep: the cells listed side by side under their mean (a view cannot expand
               # the parent run, under which the UI nests them)
               "groupBy": {"aggregateFunction": "average",
                           "groupByKeys": [{"mode": "tag", "groupByData": SWEEP_PARENT_TAG}]}},
              client=client)
    if end:
        client.set_terminated(sweep.run_id, "FINISHED" if len(finished) == len(rows) else "FAILED")
    return rows
