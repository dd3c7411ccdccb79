"""What every stage shares: the context it runs against, the outcome types, `stages.json`, and the one place a
stage's MLflow run is created (`stage_run`) and closed (`close_stage_run`).

The libraries (collector, trainer, evaluator) never create a stage's run: they log into the run id the stage
passes them (the evaluator: into the active run the stage opened).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tomtransfer.shared.config import ExperimentConfig

from tomtransfer.services.collector.store import atomic_write_json
from tomtransfer.services.common.console import say

# mlflow is imported where it is used: `tomtransfer generate` without tracking and the checks before a stage
# need none of it.


@dataclass(frozen=True)
class Context:
    """What the stages run against. `url`: the serving app's base URL (…/v1); `parent_run_id`: the MLflow run the
    stages' runs are filed under."""

    tracking_uri: str | None
    url: str | None = None
    api_key: str | None = None
    parent_run_id: str | None = None
    progress: bool | None = None


@dataclass
class Generated:
    key: str
    dataset: str
    examples: int
    samples: int
    invalid: int
    samples_path: str | None = None
    written: int = 0  # samples requested by this run (the rest were already in the store: a resumed run)
    already: int = 0
    retries: int = 0
    elapsed_s: float = 0.0
    content_hash: str | None = None  # the training set's digest
    mlflow_run_id: str | None = None
    reused: bool = False


@dataclass
class Trained:
    key: str
    adapter_dir: str
    adapter_uri: str | None
    run_id: str | None
    train_loss: float | None = None
    steps: int | None = None
    tokens_per_s: float | None = None
    wall_s: float | None = None
    reused: bool = False


@dataclass
class Evaluated:
    result: Any  # services.evaluator.scoring.EvaluationResult
    outputs: Any  # services.evaluator.report.Outputs
    store_lines: list[str] = field(default_factory=list)


class StageLog:
    """`<run_dir>/stages.json`: each stage's last outcome with its inputs key (written atomically)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"
        self.data: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def lookup(self, stage: str, key: str, cls, exists, what) -> Any | None:
        """The recorded outcome of `stage` (as `cls`, marked reused) when it was made with `key` and
        `exists(outcome)` holds; None, saying why, when the stage must run."""
        done = self.data.get(stage)
        if done and done.get("key") == key:
            outcome = cls(**{k: v for k, v in done.items() if k in {f.name for f in fields(cls)}})
            if exists(outcome):
                say(f"[{stage}] reused: {what(outcome)} earlier with the same inputs (key {key})")
                outcome.reused = True
                return outcome
        say(f"[{stage}] inputs key {key}" + (" (the inputs changed since the last run)" if done else ""))
        return None

    def mark(self, stage: str, outcome) -> None:
        record = outcome if isinstance(outcome, dict) else asdict(outcome)
        self.data[stage] = {**record, "reused": False, "finished_at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.data, self.path)


# ------------------------------------------------------------------------------------------- the stage's run
def stage_run(cfg: ExperimentConfig, ctx: Context, name: str, tags: dict[str, str], *,
              record: Path | None = None) -> tuple[str | None, bool]:
    """A stage's MLflow run, the one place one is created: None without `ctx.tracking_uri`; else the run recorded
    in `record` (an interrupted attempt with the same inputs: it continues), else a new run `name` in
    `cfg.mlflow.experiment` with `tags`, MLflow's own system tags (user, source, git commit, as
    `mlflow.start_run` sets them) and `mlflow.parentRunId` = `ctx.parent_run_id` where there is one. The id is
    written to `record` when one is given. Returns the id and whether the run was created now."""
    if not ctx.tracking_uri:
        return None, False
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    run_id = None
    if record is not None and record.is_file():
        run_id = record.read_text().strip() or None
    created = run_id is None
    if created:
        client = MlflowClient(ctx.tracking_uri)
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
        tags = dict(tags)
        if ctx.parent_run_id:
            tags["mlflow.parentRunId"] = ctx.parent_run_id
        run_id = client.create_run(exp_id, run_name=name, tags=resolve_tags(tags)).info.run_id
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(run_id + "\n")
    return run_id, created


def close_stage_run(ctx: Context, run_id: str | None, status: str = "FINISHED") -> None:
    """The end of a stage's run (`status` FINISHED or FAILED); nothing without one."""
    if run_id and ctx.tracking_uri:
        from mlflow.tracking import MlflowClient

        MlflowClient(ctx.tracking_uri).set_terminated(run_id, status)


def log_parent_metrics(ctx: Context, values: dict[str, float]) -> None:
    """Metrics on the experiment's parent run (`ctx.parent_run_id`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    for k, v in values.items():
        client.log_metric(ctx.parent_run_id, k, v)
