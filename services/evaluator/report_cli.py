"""`tomtransfer report --run-id ID`: regenerate the evaluation report of an MLflow run from its raw results.

Reads back what `services.evaluator.tracking.log_evaluation` logged: `samples/` (the raw samples Parquet
file(s) or `samples/exact.parquet`) and `config/config.yaml`; recomputes every metric with the same settings
(`evaluate.exact_n` or `evaluate.samples` as the exact-mode effective n, `evaluate.rate`, the protocol, `evaluate.bootstrap`, bootstrap seed 0 - so the numbers
equal the logged ones), and writes figures/, tables/ and report/ into `out_dir` (default
`runs/reports/<run_id>`). With `log=True` the regenerated figures, tables and report are logged back to the run.

Tracking server: `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else MLflow's default.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from tomtransfer.shared.errors import UserError

from tomtransfer.services.evaluator.scoring import EXACT_PARQUET, compute
from tomtransfer.services.evaluator.report import Outputs, write_outputs


class ReportError(UserError):
    """The run cannot be reported on (not found, no raw results)."""


def _load_config(path: Path):
    """The logged config as an ExperimentConfig when it still validates, else the raw mapping."""
    from tomtransfer.shared.config import ConfigError, parse_config

    data = yaml.safe_load(path.read_text())
    try:
        return parse_config(data, str(path))
    except ConfigError:
        return data if isinstance(data, dict) else None


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
        config = None
        if "config" in names and any(a.path == "config/config.yaml" for a in client.list_artifacts(run_id, "config")):
            cfg_path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/config.yaml",
                                                                dst_path=tmp, tracking_uri=uri))
            config = _load_config(cfg_path)
        cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else (config or {})
        ev = cfg.get("evaluate", {}) or {}
        exact = local / EXACT_PARQUET
        sampled = sorted(p for p in local.rglob("*.parquet") if p != exact)
        if not exact.is_file() and not sampled:
            raise ReportError(f"MLflow run {run_id}: samples/ holds no Parquet files")
        # Both kinds may be there: under the paper's protocol the teacher is sampled and the students exact.
        result = compute(samples=sampled or None, exact=exact if exact.is_file() else None,
                         effective_n=int(ev.get("exact_n") or ev.get("samples") or 300),
                         rate=ev.get("rate", "count"), min_valid_share=float(ev.get("min_valid_share", 0.0)),
                         protocol=config.protocol_line() if hasattr(config, "protocol_line") else None,
                         n_resamples=int(ev.get("bootstrap") or 2000), seed=0)
        out = Path(out_dir) if out_dir is not None else Path("runs") / "reports" / run_id
        info = {"MLflow run": run_id, "run name": run.info.run_name, "experiment": experiment, "tracking URI": uri}
        outputs = write_outputs(result, out, config=config, run_info=info)

    if log:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            for sub in ("figures", "tables", "report"):
                d = outputs.root / sub
                if d.is_dir() and any(d.iterdir()):
                    mlflow.log_artifacts(str(d), sub)
    return outputs
