"""`tomtransfer generate`: the teacher dataset.

For every selected scenario (`scenarios.ids` if given, else `generate.families`), N = `generate.samples`
samples from the served model `teacher` with the `generate.instruction` prompt (answer, then motivation),
at `sampling.temperature` / `top_p` / `max_tokens`, `generate.request_n` samples per request and
`generate.concurrency` requests in flight (`services.collector.runner`).

Output under `<output_dir>/<name>/generate/<key>/` (key: the hash of the inputs, `generate_dir`):

  samples/samples.parquet   raw samples (schema: services.collector.store.SAMPLE_SCHEMA), exactly N per
                            scenario; `samples/shards/` while a run is in progress or was interrupted
  dataset/                  the training set and its exports (services.trainer.dataset): train.parquet,
                            LLaMA-Factory alpaca/sharegpt JSON + dataset_info.json, DATASET_CARD.md

Rerunning the same command resumes: only missing samples are requested; a kill -9 at any moment loses at
most the requests in flight. Seeds are per (scenario, block of samples), so a resumed run's samples equal
an uninterrupted run's (given a server deterministic in (seed, n), which the project's engines are).

MLflow: `log_generate_to_mlflow` logs into a run it is given (the pipeline's generate stage creates it,
`<name>-generate`): the settings as params, counts, per-scenario C-rates and the teacher's cost
(`teacher_cost.tokens`, `teacher_cost.forward_passes`, ...: services.collector.cost) as metrics, the training set
as an MLflow dataset input (name, digest, schema) and the card, exports and raw samples as artifacts. This module
creates no run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tomtransfer.shared.config import ExperimentConfig

from tomtransfer.services.collector.collection import collect_into
from tomtransfer.services.collector.cost import metrics as cost_metrics, samples_cost
from tomtransfer.services.collector.jobs import as_config, role_identity, select_scenarios
from tomtransfer.services.collector.runner import RequestSettings, RetryPolicy, RunReport
from tomtransfer.services.collector.store import SampleStore
from tomtransfer.services.common.checks import check_secrets
from tomtransfer.services.common.fingerprint import generate_key
from tomtransfer.services.trainer.dataset import export_training_set, log_dataset_to_mlflow

# mlflow is imported where it is used: a slow import, and a store can be filled without tracking.


@dataclass
class GenerateResult:
    run_id: str
    samples_path: Path
    dataset_dir: Path
    report: RunReport
    dataset: object | None = None  # services.trainer.dataset.DatasetExport
    scenarios: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the sampling settings (the MLflow params)
    teacher: dict = field(default_factory=dict)  # the teacher's identity (`role_identity`)


def generate_dir(cfg: ExperimentConfig) -> Path:
    """`<run_dir>/generate/<key>`: the key hashes exactly what the samples and the training set depend on
    (`services.common.fingerprint.generate_key`), so other inputs never find these outputs."""
    ids = [s.id for s in select_scenarios(cfg, list(cfg.generate.families))]
    return cfg.run_dir / "generate" / generate_key(cfg, ids)


def generate(
    config: str | Path | ExperimentConfig,
    *,
    base_url: str | None = None,
    targets: str | None = None,
    valid_policy: str | None = None,
    progress: bool | None = None,
    retry: RetryPolicy | None = None,
    export: bool = True,
) -> GenerateResult:
    """Sample the teacher (resuming), compact the samples, build the training set and exports (`export`)."""
    cfg = as_config(config)
    check_secrets(cfg)  # before the store folder is made
    g = cfg.generate
    scenarios = select_scenarios(cfg, list(g.families))
    settings = {
        "stage": "generate",
        "instruction": g.instruction,
        "temperature": cfg.sampling.temperature,
        "top_p": cfg.sampling.top_p,
        "max_tokens": cfg.sampling.max_tokens,
        "seed": cfg.sampling.seed,
        "block_size": g.request_n,
    }
    teacher = role_identity(cfg, "teacher")
    out = generate_dir(cfg)
    store = SampleStore(out / "samples")
    params = RequestSettings(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            max_tokens=cfg.sampling.max_tokens, seed=cfg.sampling.seed, block_size=g.request_n)
    got = asyncio.run(collect_into(
        store, cfg, stage="generate", role="teacher", spec=teacher, settings=settings, scenarios=scenarios,
        n=g.samples, instruction=g.instruction, params=params, base_url=base_url, concurrency=g.concurrency,
        retry=retry, progress=progress, description=f"generate: teacher, {len(scenarios)} scenarios x {g.samples}"))
    result = GenerateResult(run_id=got.run_id, samples_path=got.path, dataset_dir=out / "dataset", report=got.report,
                            scenarios=[s.id for s in scenarios], settings=settings, teacher=teacher)
    if export:
        table = store.read()
        ids = [s.id for s in scenarios]
        table = table.filter(pc.and_(pc.equal(table["role"], "teacher"),
                                     pc.is_in(table["scenario_id"], value_set=pa.array(ids))))
        result.dataset = export_training_set(
            table.to_pandas(), result.dataset_dir, name=cfg.name,
            targets=targets or g.targets, valid_policy=valid_policy or g.valid_policy,  # type: ignore[arg-type]
            teacher=f"{teacher['model']} ({teacher['engine']}, served as {teacher['served']})",
        )
    return result


def log_generate_to_mlflow(cfg: ExperimentConfig, result: GenerateResult, *, run_id: str, tracking_uri: str) -> None:
    """Log an exported `result` into the MLflow run `run_id` at `tracking_uri` (the generate stage's run, which
    the caller created and closes): params, metrics, the training set as a dataset input, the raw samples."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    ex = result.dataset
    client = MlflowClient(tracking_uri)
    params = {
        **{k: v for k, v in result.settings.items() if k != "stage"},
        "teacher_model": result.teacher["model"], "teacher_engine": result.teacher["engine"],
        "samples_per_scenario": cfg.generate.samples, "scenarios": len(result.scenarios),
        "families": ",".join(cfg.generate.families) if not cfg.scenarios.ids else "ids",
        "targets": ex.targets, "valid_policy": ex.valid_policy, "concurrency": cfg.generate.concurrency,
        "sample_run_id": result.run_id,
    }
    metrics = {
        "samples": float(ex.samples), "examples": float(ex.examples), "invalid": float(ex.invalid),
        "invalid_rate": ex.invalid / ex.samples if ex.samples else 0.0,
        "requests": float(result.report.requests), "retries": float(result.report.retries),
        "generate_seconds": result.report.elapsed_s,
    }
    for s in ex.scenarios:
        if s["c_rate"] is not None:
            metrics[f"c_rate.{s['scenario_id']}"] = s["c_rate"]
        if s["mean_contribution"] is not None:
            metrics[f"mean_contribution.{s['scenario_id']}"] = s["mean_contribution"]
        metrics[f"invalid_rate.{s['scenario_id']}"] = s["invalid_rate"]
    metrics |= teacher_cost_metrics(result.samples_path)
    now = get_current_time_millis()
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    log_dataset_to_mlflow(ex, run_id=run_id, tracking_uri=tracking_uri)
    client.log_artifact(run_id, str(result.samples_path), "samples")


def teacher_cost_metrics(samples_path: str | Path, prefix: str = "teacher_cost") -> dict[str, float]:
    """`<prefix>.tokens`, `.forward_passes`, ... of the teacher's samples in `samples_path`
    (services.collector.cost)."""
    table = pq.read_table(samples_path, columns=["role", "prompt_tokens", "completion_tokens"])
    rows = [r for r in table.to_pylist() if r["role"] == "teacher"]
    return cost_metrics(samples_cost(rows), prefix)
