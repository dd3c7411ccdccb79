"""Evaluation evidence: what each role answered, measured the way the protocol says.

Roles (`evaluate.roles`) -> served models: teacher -> `teacher`, student_base -> `student`,
student_finetuned -> `student:<training.adapter_name>`. Scenarios: `scenarios.ids` if given, else
`evaluate.families`. Each role has its own instruction (`evaluate.protocol`, default the paper's: the teacher
answers with a motivation, the students answer only; `evaluate.instructions` overrides per role) and so its own
estimator and token cap:

- sampled (`sample_roles`): N = `evaluate.samples` per (role, scenario) through the same runner and store as
  `generate` (`services.common.runner`): resumable, exactly N, no duplicates, same seeds -> same rows; parsed
  with the full rule (the answer may come after prose). `<run_dir>/evaluate/samples/samples.parquet`.
- exact (`exact_roles`): only for roles whose instruction puts the answer first (`answer_only`) and
  `evaluate.estimator: exact`: one call per (role, scenario) to `POST /v1/exact`, one row each (p_C, p_D,
  valid_mass, PGG distribution). `<run_dir>/evaluate/exact/exact.parquet`.
- the teacher's generated dataset (`dataset_reference`): where the teacher is evaluated with the dataset's
  instruction (`ExperimentConfig.teacher_from_dataset`), its rates on the scenarios the dataset covers are the
  generated samples themselves, re-parsed with today's rule (the paper's teacher counts; no second pass).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shared.config import ExperimentConfig
from shared.scenarios import Scenario

from services.common.runner import RetryPolicy, RunReport, SamplingParams, exact_async, parse_answer, sample_async
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
class Evidence:
    """Everything the metrics need: sampled rows (evaluated and dataset) and exact rows, either may be None."""

    samples: pd.DataFrame | None = None
    exact: pd.DataFrame | None = None
    paths: list[Path] = field(default_factory=list)
    reports: list[RunReport] = field(default_factory=list)
    dataset_scenarios: list[str] = field(default_factory=list)  # where the teacher's reference is its dataset

    @property
    def estimator(self) -> str:
        if self.exact is None:
            return "sample"
        return "exact" if self.samples is None else "mixed"


def evaluate_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "evaluate"


def dataset_samples_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "generate" / "samples"


def _only(table: pa.Table, roles: list[str], scenario_ids: list[str]) -> pa.Table:
    return table.filter(pc.and_(pc.is_in(table["role"], value_set=pa.array(roles)),
                                pc.is_in(table["scenario_id"], value_set=pa.array(scenario_ids))))


def _max_tokens(cfg: ExperimentConfig, role: str) -> int:
    e = cfg.evaluate
    if e.instruction_for(role) == "answer_only":
        return e.max_tokens
    return e.motivation_max_tokens or cfg.sampling.max_tokens


def collect(config: str | Path | ExperimentConfig, *, base_url: str | None = None, progress: bool | None = None,
            retry: RetryPolicy | None = None) -> Evidence:
    """Measure every selected (role, scenario) once, by the protocol (see the module docstring)."""
    cfg = as_config(config)
    e = cfg.evaluate
    scenarios = select_scenarios(cfg, list(e.families))
    ev = Evidence()
    teacher_done: set[str] = set()
    if cfg.teacher_from_dataset:
        ref = dataset_reference(cfg, scenarios)
        if ref is not None and len(ref):
            teacher_done = set(ref["scenario_id"])
            ev.dataset_scenarios = sorted(teacher_done)
            ev.samples = ref
    frames = [ev.samples] if ev.samples is not None else []
    sampled = [r for r in e.roles if e.estimator_for(r) == "sample"]
    exact = [r for r in e.roles if e.estimator_for(r) == "exact"]
    if sampled:
        jobs_scenarios = {r: [s for s in scenarios if not (r == "teacher" and s.id in teacher_done)] for r in sampled}
        if any(jobs_scenarios.values()):
            got = sample_roles(cfg, jobs_scenarios, base_url=base_url, progress=progress, retry=retry)
            frames.append(got[0].to_pandas())
            ev.paths.append(got[1])
            ev.reports.append(got[2])
    if frames:
        ev.samples = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if exact:
        table, path, report = exact_roles(cfg, exact, scenarios, base_url=base_url, progress=progress, retry=retry)
        ev.exact = table.to_pandas()
        ev.paths.append(path)
        ev.reports.append(report)
    return ev


def dataset_reference(cfg: ExperimentConfig, scenarios: list[Scenario]) -> pd.DataFrame | None:
    """The teacher's generated samples on the selected scenarios, re-parsed with today's rule; None if absent."""
    store = SampleStore(dataset_samples_dir(cfg))
    if not store.root.is_dir():
        return None
    by_id = {s.id: s for s in scenarios}
    table = _only(store.read(), ["teacher"], list(by_id))
    if not table.num_rows:
        return None
    df = table.to_pandas()
    df["answer"] = [parse_answer(by_id[sid], text) for sid, text in zip(df["scenario_id"], df["response"])]
    df["valid"] = df["answer"].notna()
    df["source"] = "dataset"
    return df


def sample_roles(cfg: ExperimentConfig, scenarios_of: dict[str, list[Scenario]], *, base_url: str | None = None,
                 progress: bool | None = None, retry: RetryPolicy | None = None):
    """N samples per (role, scenario), each role with its own instruction and token cap."""
    e = cfg.evaluate
    roles = [r for r, ss in scenarios_of.items() if ss]
    settings = {"stage": "evaluate", "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
                "seed": cfg.sampling.seed, "block_size": e.request_n}
    # What a role's rows depend on besides the shared settings; the manifest may gain roles later.
    idents = {r: {**role_identity(cfg, r), "instruction": e.instruction_for(r), "max_tokens": _max_tokens(cfg, r)}
              for r in roles}
    run_id = run_id_for("evaluate", cfg, settings)
    store = SampleStore(evaluate_dir(cfg) / "samples")
    interleave = interleave_roles(cfg)
    instructions = {r: e.instruction_for(r) for r in roles}
    caps = {r: _max_tokens(cfg, r) for r in roles}
    jobs = []
    for r in roles:  # role-major when grouped; scenario-major otherwise (below)
        jobs += jobs_for(cfg, [r], scenarios_of[r], e.samples, instructions, max_tokens=caps)
    if interleave:
        order = {s.id: i for i, s in enumerate(dict.fromkeys(s for ss in scenarios_of.values() for s in ss))}
        jobs.sort(key=lambda j: order[j.scenario.id])
    params = SamplingParams(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, max_tokens=e.max_tokens,
                            seed=cfg.sampling.seed, block_size=e.request_n)
    n_sc = len({j.scenario.id for j in jobs})
    with store.writer():
        check_manifest(store, {"version": 2, "run_id": run_id, **settings, "roles": idents})
        report = asyncio.run(sample_async(
            store, jobs, base_url=endpoint_url(cfg, base_url), params=params, run_id=run_id,
            concurrency=e.concurrency, api_key=api_key(cfg), retry=retry or RetryPolicy(), progress=progress,
            description=f"evaluate (sampled): {len(roles)} role(s) x {n_sc} scenarios x {e.samples}",
        ))
        path = store.compact()
    wanted = sorted({j.scenario.id for j in jobs})
    table = _only(store.read(), roles, wanted)
    keep = pc.is_in(pc.binary_join_element_wise(table["role"], table["scenario_id"], "/"),
                    value_set=pa.array([j.label for j in jobs]))
    return table.filter(keep), path, report


def exact_roles(cfg: ExperimentConfig, roles: list[str], scenarios: list[Scenario], *, base_url: str | None = None,
                progress: bool | None = None, retry: RetryPolicy | None = None):
    """One exact-mode call per (role, scenario) on the answer-only prompt."""
    e = cfg.evaluate
    settings = {"stage": "evaluate-exact", "temperature": cfg.sampling.temperature}
    idents = {r: {**role_identity(cfg, r), "instruction": e.instruction_for(r)} for r in roles}
    run_id = run_id_for("exact", cfg, settings)
    store = ExactStore(evaluate_dir(cfg) / "exact")
    jobs = jobs_for(cfg, roles, scenarios, 1, {r: e.instruction_for(r) for r in roles}, interleave_roles(cfg))
    with store.writer():
        check_manifest(store, {"version": 2, "run_id": run_id, **settings, "roles": idents})
        report = asyncio.run(exact_async(
            store, jobs, base_url=endpoint_url(cfg, base_url), temperature=cfg.sampling.temperature, run_id=run_id,
            concurrency=min(e.concurrency, 4), api_key=api_key(cfg), retry=retry or RetryPolicy(),
            progress=progress, description=f"exact: {len(roles)} role(s) x {len(scenarios)} scenarios",
        ))
        path = store.compact()
    return _only(store.read(), roles, [s.id for s in scenarios]), path, report
