"""Evaluation data collection: raw samples (sampled estimator) or exact probabilities (exact estimator).

Roles (`evaluate.roles`) -> served models: teacher -> `teacher`, student_base -> `student`,
student_finetuned -> `student:<training.adapter_name>`. Scenarios: `scenarios.ids` if given, else
`evaluate.families`. Prompt: `evaluate.instruction` (answer only, as the paper), `evaluate.max_tokens`,
`sampling.temperature` / `top_p` / `seed`.

- sampled (`collect_samples`): N = `evaluate.samples` per (role, scenario) through the same runner and store
  as `generate` (`services.common.runner`): resumable, exactly N, no duplicates, same seeds -> same rows.
  Output: `<run_dir>/evaluate/samples/samples.parquet` (SAMPLE_SCHEMA).
- exact (`collect_exact`): one call per (role, scenario) to the serving app's exact endpoint
  (`POST /v1/exact`), one row each (EXACT_SCHEMA: p_C, p_D, valid_mass, PGG distribution as JSON).
  Output: `<run_dir>/evaluate/exact/exact.parquet`. Resumable the same way (done rows are skipped).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from shared.config import ExperimentConfig

from services.common.runner import RetryPolicy, RunReport, SamplingParams, exact_async, sample_async
from services.common.samples import ExactStore, SampleStore, check_manifest
from services.common.stage import (
    api_key,
    as_config,
    base_url as endpoint_url,
    interleave_roles,
    jobs_for,
    role_identity,
    run_id_for,
    select_scenarios,
)


@dataclass
class CollectResult:
    estimator: Literal["sample", "exact"]
    run_id: str
    path: Path  # samples.parquet or exact.parquet
    report: RunReport
    table: pa.Table  # the rows of this collection (selected roles and scenarios only)


def evaluate_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "evaluate"


def _only(table: pa.Table, roles: list[str], scenario_ids: list[str]) -> pa.Table:
    return table.filter(pc.and_(pc.is_in(table["role"], value_set=pa.array(roles)),
                                pc.is_in(table["scenario_id"], value_set=pa.array(scenario_ids))))


def collect(config: str | Path | ExperimentConfig, *, estimator: str | None = None, **kwargs) -> CollectResult:
    cfg = as_config(config)
    est = estimator or cfg.evaluate.estimator
    if est == "exact":
        return collect_exact(cfg, **kwargs)
    if est == "sample":
        return collect_samples(cfg, **kwargs)
    from shared.errors import UserError

    raise UserError(f"unknown estimator {est!r}; expected sample or exact")


def collect_samples(
    config: str | Path | ExperimentConfig,
    *,
    roles: list[str] | None = None,
    families: list[str] | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
    retry: RetryPolicy | None = None,
) -> CollectResult:
    cfg = as_config(config)
    e = cfg.evaluate
    roles = list(roles or e.roles)
    scenarios = select_scenarios(cfg, list(families or e.families))
    settings = {
        "stage": "evaluate",
        "instruction": e.instruction,
        "temperature": cfg.sampling.temperature,
        "top_p": cfg.sampling.top_p,
        "max_tokens": e.max_tokens,
        "seed": cfg.sampling.seed,
        "block_size": e.request_n,
    }
    idents = {r: role_identity(cfg, r) for r in roles}
    run_id = run_id_for("evaluate", cfg, settings)
    store = SampleStore(evaluate_dir(cfg) / "samples")
    jobs = jobs_for(cfg, roles, scenarios, e.samples, e.instruction, interleave_roles(cfg))
    params = SamplingParams(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, max_tokens=e.max_tokens,
                            seed=cfg.sampling.seed, block_size=e.request_n)
    with store.writer():
        check_manifest(store, {"version": 1, "run_id": run_id, **settings, "roles": idents})
        report = asyncio.run(sample_async(
            store, jobs, base_url=endpoint_url(cfg, base_url), params=params, run_id=run_id,
            concurrency=e.concurrency, api_key=api_key(cfg), retry=retry or RetryPolicy(), progress=progress,
            description=f"evaluate: {len(roles)} roles x {len(scenarios)} scenarios x {e.samples}",
        ))
        path = store.compact()
    table = _only(store.read(), roles, [s.id for s in scenarios])
    return CollectResult("sample", run_id, path, report, table)


def collect_exact(
    config: str | Path | ExperimentConfig,
    *,
    roles: list[str] | None = None,
    families: list[str] | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
    retry: RetryPolicy | None = None,
) -> CollectResult:
    cfg = as_config(config)
    e = cfg.evaluate
    roles = list(roles or e.roles)
    scenarios = select_scenarios(cfg, list(families or e.families))
    settings = {"stage": "evaluate-exact", "instruction": e.instruction, "temperature": cfg.sampling.temperature}
    idents = {r: role_identity(cfg, r) for r in roles}
    run_id = run_id_for("exact", cfg, settings)
    store = ExactStore(evaluate_dir(cfg) / "exact")
    jobs = jobs_for(cfg, roles, scenarios, 1, e.instruction, interleave_roles(cfg))
    with store.writer():
        check_manifest(store, {"version": 1, "run_id": run_id, **settings, "roles": idents})
        report = asyncio.run(exact_async(
            store, jobs, base_url=endpoint_url(cfg, base_url), temperature=cfg.sampling.temperature, run_id=run_id,
            concurrency=min(e.concurrency, 4), api_key=api_key(cfg), retry=retry or RetryPolicy(),
            progress=progress, description=f"exact: {len(roles)} roles x {len(scenarios)} scenarios",
        ))
        path = store.compact()
    table = _only(store.read(), roles, [s.id for s in scenarios])
    return CollectResult("exact", run_id, path, report, table)
