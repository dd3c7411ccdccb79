"""Regenerate the evaluation report of an MLflow run from its raw results (`tomtransfer report --run-id ID`).

Reads back what `services.evaluator.tracking.log_evaluation` logged: `samples/` (the raw samples Parquet
file(s) or `samples/exact.parquet`) and `config/config.yaml`; recomputes every metric with the same settings
(`evaluate.exact_n` or `evaluate.samples` as the exact-mode effective n, `evaluate.rate`, `evaluate.min_valid_share`,
the protocol, `evaluate.bootstrap`, bootstrap seed 0 - so the numbers equal the logged ones), and writes figures/,
tables/ and report/ into `out_dir` (default `runs/reports/<run_id>`). With `log=True` the regenerated figures,
tables and report are logged back to the run.

A logged config that no longer validates against the current schema (an older run) is not read at all: the metrics
use the evaluator's own defaults and the report's configuration section says so, with the validation error.

Tracking server: `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else MLflow's default.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from tomtransfer.shared.config import ConfigError, EvaluateConfig, ExperimentConfig, parse_config
from tomtransfer.shared.errors import UserError

from tomtransfer.services.common.console import say
from tomtransfer.services.evaluator.report import Outputs, write_outputs
from tomtransfer.services.evaluator.scoring import EXACT_PARQUET, compute
from tomtransfer.services.evaluator.tracking import CONFIG_YAML


class ReportError(UserError):
    """The run cannot be reported on (not found, no raw results)."""


def _load_config(path: Path) -> tuple[ExperimentConfig | None, EvaluateConfig | None, str | None]:
    """(the logged config, its evaluate section, None) when it validates against the current schema; else (None,
    the evaluate section when that part alone still validates, the one-line error) - the metric settings of an
    older run then still come from what it logged."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return None, None, f"{CONFIG_YAML}: not readable YAML ({type(e).__name__})"
    try:
        config = parse_config(raw, CONFIG_YAML)
        return config, config.evaluate, None
    except ConfigError as e:
        section = raw.get("evaluate") if isinstance(raw, dict) else None
        try:
            evaluate = EvaluateConfig.model_validate(section) if isinstance(section, dict) else None
        except ValidationError:
            evaluate = None
        return None, evaluate, str(e)


def report(run_id: str, tracking_uri: str | None = None, out_dir: str | Path | None = None, *,
           log: bool = False) -> Outputs:
    """Regenerate the report of MLflow run `run_id`; returns the written outputs (`.report["html"]`, ...)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"MLflow run {run_id!r} not found at {uri} ({e.error_code})") from None
    try:
        experiment = client.get_experiment(run.info.experiment_id).name
    except MlflowException:
        experiment = run.info.experiment_id
    names = {a.path for a in client.list_artifacts(run_id)}
    if "samples" not in names:
        raise ReportError(f"MLflow run {run_id} has no samples/ artifacts (is it an evaluate run?)")

    with tempfile.TemporaryDirectory(prefix="tt-report-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples", dst_path=tmp,
                                                         tracking_uri=uri))
        config, ev, config_error = None, None, None
        logged = f"config/{CONFIG_YAML}"
        if "config" in names and any(a.path == logged for a in client.list_artifacts(run_id, "config")):
            config, ev, config_error = _load_config(Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=logged, dst_path=tmp, tracking_uri=uri)))
        exact = local / EXACT_PARQUET
        sampled = sorted(p for p in local.rglob("*.parquet") if p != exact)
        if not exact.is_file() and not sampled:
            raise ReportError(f"MLflow run {run_id}: samples/ holds no Parquet files")
        # Both kinds may be there: under the paper's protocol the teacher is sampled and the students exact.
        if config_error:
            say(f"note: the logged config could not be read as the current schema ({config_error}); the metrics "
                + ("use its evaluate section, which still reads" if ev is not None
                   else "use the evaluator's default settings"))
        settings = {}
        if ev is not None:  # else the evaluator's defaults
            settings = {"effective_n": ev.exact_n or ev.samples, "rate": ev.rate, "min_valid_share": ev.min_valid_share,
                        "n_resamples": ev.bootstrap}
        if config is not None:
            settings["protocol"] = config.protocol_line()
        result = compute(samples=sampled or None, exact=exact if exact.is_file() else None, seed=0, **settings)
        out = Path(out_dir) if out_dir is not None else Path("runs") / "reports" / run_id
        info = {"MLflow run": run_id, "run name": run.info.run_name, "experiment": experiment, "tracking URI": uri}
        outputs = write_outputs(result, out, config=config, config_error=config_error, run_info=info)

    if log:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            for sub in ("figures", "tables", "report"):
                d = outputs.root / sub
                if d.is_dir() and any(d.iterdir()):
                    mlflow.log_artifacts(str(d), sub)
    return outputs
