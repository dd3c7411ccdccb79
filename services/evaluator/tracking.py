"""Logging an evaluation to MLflow, under the active run, so runs compare in the UI.

What lands where (`log_evaluation`):

  params      the experiment config flattened with dots (`models.teacher.model`, `evaluate.samples`, ...);
              lists as JSON. A key the run already holds with the same value is fine; one it holds with
              another value is left alone and reported (MLflow params are immutable) - never an error.
  metrics     `EvaluationResult.flat_metrics()` (stable names, see services.evaluator.metrics), sent with
              `mlflow.log_metrics` in batches of at most 500
  tags        tomtransfer.stage = evaluate, tomtransfer.estimator, tomtransfer.samples
  figures/    PNGs            tables/   Table 1 (csv/md/tex), scenarios/rates/summary/pgg CSVs, evaluation.json
  report/     report.md, report.html (links ../figures/), report_standalone.html (figures embedded)
  samples/    the raw samples Parquet file(s) (folder structure kept) or `samples/exact.parquet`
  config/     config.yaml (the resolved config, what `report --run-id` reads back) [+ the original file]

`evaluate_and_log(...)` is the whole evaluate-stage tail: metrics -> figures, tables, report -> MLflow.
mlflow is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from services.evaluator.metrics import EXACT_PARQUET, EvaluationResult, compute
from services.evaluator.report import Outputs, write_outputs

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
    config: Any = None,
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
            if hasattr(config, "evaluate"):
                params[f"evaluate.instruction.{role}"] = config.evaluate.instruction_for(role)
                params[f"evaluate.estimator.{role}"] = config.evaluate.estimator_for(role)
        summary["param_conflicts"] = log_params(params)
    summary["metrics"] = log_metrics(result.flat_metrics())
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
    config: Any = None,
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

    cfg = config_dict(config) if config is not None else {}
    ev = cfg.get("evaluate", {}) if cfg else {}
    n = ev.get("samples")
    protocol = config.protocol_line() if hasattr(config, "protocol_line") else None
    result = compute(
        samples=samples, exact=exact,
        expected_samples=expected_samples if expected_samples is not None else (n if samples is not None else None),
        effective_n=effective_n or ev.get("exact_n") or n or 300,
        rate=ev.get("rate", "count"), min_valid_share=ev.get("min_valid_share", 0.0), protocol=protocol,
        n_resamples=n_resamples or ev.get("bootstrap") or 2000,
    )
    info = dict(run_info or {})
    active = mlflow.active_run() if log else None
    if active is not None:
        info.setdefault("MLflow run", active.info.run_id)
    outputs = write_outputs(result, out_dir, config=config, run_info=info)
    if active is not None:
        log_evaluation(result, outputs, config=config, config_path=config_path, samples=samples, exact=exact)
    return result, outputs

