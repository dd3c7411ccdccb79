"""Evaluation evidence: what each role answered, measured the way the protocol says.

Roles (`evaluate.roles`) -> served models: teacher -> `teacher`, student_base -> `student`,
student_finetuned -> `student:<training.adapter_name>`, student_placebo (`training.placebo`) ->
`student:<training.adapter_name>-placebo`, measured exactly like student_finetuned. Scenarios: `scenarios.ids` if
given, else `evaluate.families`. Each role has its own instruction (`evaluate.protocol`, default the paper's: the
teacher answers with a motivation, the students answer only; `evaluate.instructions` overrides per role) and so its
own estimator and token cap:

- sampled (`sample_roles`): N = `evaluate.samples` per (role, scenario) through the same runner and store as
  `generate` (`services.collector.runner`): resumable, exactly N, no duplicates, same seeds -> same rows; parsed
  with the full rule (the answer may come after prose).
- exact (`exact_roles`): only for roles whose instruction puts the answer first (`answer_only`) and
  `evaluate.estimator: exact`: one call per (role, scenario) to `POST /v1/exact`, one row each (p_C, p_D,
  valid_mass, PGG distribution).
- the teacher's leading-answer mass (`teacher_lead`, `evaluate.teacher_lead`): one exact call per 2x2 scenario on
  the teacher's own evaluation prompt (with motivation under the paper's protocol), in its own store
  (`<run_dir>/evaluate/teacher_lead-<key>/exact/`); rows with role `teacher` and `part` = "lead", beside the
  students' exact rows. Exact mode reads only the leading answer, so p_C / p_D are P(the response starts with C /
  D); the teacher's samples (dataset or fresh, as before) stay in the samples and give the rest.
Each role has its own store, `<run_dir>/evaluate/<role>-<key>/{samples,exact}/`, keyed by everything its rows
depend on (`role_spec`: weights, adapter content, prompt, estimator, sampling settings): a rerun reuses a role's
rows only when those are unchanged (a retrained adapter re-measures the fine-tuned student alone), and never
reports rows made from other inputs.
- the teacher's generated dataset (`dataset_reference`): where the teacher is evaluated with the dataset's
  instruction (`ExperimentConfig.teacher_from_dataset`), its rates on the scenarios the dataset covers are the
  generated samples themselves, re-parsed with today's rule (the paper's teacher counts; no second pass).
The sampled and the exact roles run at the same time when `evaluate.role_order` interleaves roles (replicas on
their own GPUs or nodes), one group after the other when they share CPU cores.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.samples import ADAPTER_SUFFIX, LEAD_PART
from tomtransfer.shared.scenarios import Scenario

from tomtransfer.services.collector.collection import collect_into
from tomtransfer.services.collector.generate import generate_dir
from tomtransfer.services.collector.jobs import interleave_roles, role_identity, select_scenarios
from tomtransfer.services.collector.runner import RequestSettings, RetryPolicy, RunReport, parse_answer
from tomtransfer.services.collector.store import ExactStore, SampleStore
from tomtransfer.services.common.fingerprint import model_identity, role_key


@dataclass
class Evidence:
    """Everything the metrics need: sampled rows (evaluated and dataset) and exact rows, either may be None."""

    samples: pd.DataFrame | None = None
    exact: pd.DataFrame | None = None
    paths: list[Path] = field(default_factory=list)
    reports: list[RunReport] = field(default_factory=list)
    dataset_scenarios: list[str] = field(default_factory=list)  # where the teacher's reference is its dataset
    store_lines: list[str] = field(default_factory=list)  # per role: its store, new or reused rows

    @property
    def estimator(self) -> str:
        if self.exact is None:
            return "sample"
        return "exact" if self.samples is None else "mixed"


def evaluate_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "evaluate"


def dataset_samples_dir(cfg: ExperimentConfig) -> Path:
    return generate_dir(cfg) / "samples"


def _only(table: pa.Table, roles: list[str], scenario_ids: list[str]) -> pa.Table:
    return table.filter(pc.and_(pc.is_in(table["role"], value_set=pa.array(roles)),
                                pc.is_in(table["scenario_id"], value_set=pa.array(scenario_ids))))


def _max_tokens(cfg: ExperimentConfig, role: str) -> int:
    e = cfg.evaluate
    if e.instruction_for(role) == "answer_only":
        return e.max_tokens
    return e.motivation_max_tokens or cfg.sampling.max_tokens


def role_spec(cfg: ExperimentConfig, role: str, adapter: dict | None = None) -> dict:
    """Everything a role's evaluation rows depend on; its hash names the role's store."""
    e = cfg.evaluate
    spec = cfg.models.teacher if role == "teacher" else cfg.models.student
    est = e.estimator_for(role)
    out = {**role_identity(cfg, role), "weights": model_identity(spec), "instruction": e.instruction_for(role),
           "estimator": est, "temperature": cfg.sampling.temperature}
    if est == "sample":
        out |= {"top_p": cfg.sampling.top_p, "seed": cfg.sampling.seed, "block_size": e.request_n,
                "max_tokens": _max_tokens(cfg, role)}
    if role in ADAPTER_SUFFIX and adapter is not None:
        out["adapter"] = adapter  # the adapter's content, not only its name or path
    return out


def role_dir(cfg: ExperimentConfig, role: str, adapter: dict | None = None) -> Path:
    """A role's store; `adapter`: the identity of that role's adapter (student_finetuned / student_placebo)."""
    return evaluate_dir(cfg) / f"{role}-{role_key(role_spec(cfg, role, adapter))}"


def lead_spec(cfg: ExperimentConfig) -> dict:
    """What the teacher's leading-answer rows depend on: its weights, its evaluation prompt, exact mode at T."""
    return {**role_identity(cfg, "teacher"), "weights": model_identity(cfg.models.teacher),
            "instruction": cfg.evaluate.instruction_for("teacher"), "estimator": "exact", "part": LEAD_PART,
            "temperature": cfg.sampling.temperature}


def lead_dir(cfg: ExperimentConfig) -> Path:
    return evaluate_dir(cfg) / f"teacher_lead-{role_key(lead_spec(cfg))}"


def lead_scenarios(scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios the teacher's leading-answer mass is measured on: the 2x2 games (the PGG keeps its samples)."""
    return [s for s in scenarios if not s.is_pgg]


def store_dirs(cfg: ExperimentConfig, adapters: dict[str, dict | None] | None = None) -> dict[str, Path]:
    """Every store the evaluate stage reads for this config: each role's (sampled or exact) and the teacher's
    leading-answer store when `teacher_lead` is on. `adapters`: role -> its adapter's identity."""
    e = cfg.evaluate
    out = {r: role_dir(cfg, r, (adapters or {}).get(r)) / ("exact" if e.estimator_for(r) == "exact" else "samples")
           for r in e.roles}
    if e.teacher_lead_on:
        out["teacher_lead"] = lead_dir(cfg) / "exact"
    return out


def collect(cfg: ExperimentConfig, *, base_url: str | None = None, progress: bool | None = None,
            retry: RetryPolicy | None = None, adapter: dict | None = None,
            placebo_adapter: dict | None = None) -> Evidence:
    """Measure every selected (role, scenario) once, by the protocol (see the module docstring). `adapter` /
    `placebo_adapter`: the fine-tuned / placebo student's adapter identity (content hash) when known."""
    e = cfg.evaluate
    adapters = {"student_finetuned": adapter, "student_placebo": placebo_adapter}
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
    lead = e.teacher_lead_on and bool(lead_scenarios(scenarios))
    jobs_scenarios = {r: [s for s in scenarios if not (r == "teacher" and s.id in teacher_done)] for r in sampled}
    # Exact-mode roles beside the sampled ones when the replicas do not share cores (the paper's protocol on GPUs:
    # the students' exact calls no longer wait for the teacher's motivated samples); one after another otherwise.
    overlap = (bool(exact) or lead) and any(jobs_scenarios.values()) and interleave_roles(cfg)
    shown = "lines" if overlap and progress is not False else progress  # two groups share one terminal

    def exact_now() -> dict:
        return exact_roles(cfg, exact, scenarios, base_url=base_url, progress=shown, retry=retry, adapters=adapters,
                           lead=lead)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(exact_now) if overlap else None
        if any(jobs_scenarios.values()):
            for role, (table, path, report) in sample_roles(cfg, jobs_scenarios, base_url=base_url, progress=shown,
                                                             retry=retry, adapters=adapters).items():
                frames.append(table.to_pandas())
                ev.paths.append(path)
                ev.reports.append(report)
                ev.store_lines.append(_store_line(role, path, report))
        exact_out = pending.result() if pending else (exact_now() if exact or lead else {})
    if frames:
        ev.samples = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if exact_out:
        tables = []
        for role, (table, path, report) in exact_out.items():
            tables.append(table.to_pandas())
            ev.paths.append(path)
            ev.reports.append(report)
            ev.store_lines.append(_store_line(role, path, report))
        ev.exact = pd.concat(tables, ignore_index=True)
    return ev


def _store_line(role: str, path: Path, report: RunReport) -> str:
    return (f"{role}: {report.written} new row(s), {report.already} reused, store "
            f"{path.parent.parent.name}/{path.parent.name}")


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
                 progress: bool | None = None, retry: RetryPolicy | None = None,
                 adapters: dict[str, dict | None] | None = None) -> dict[str, tuple[pa.Table, Path, RunReport]]:
    """N samples per (role, scenario), each role with its own instruction, token cap and store. Roles run one
    after another when grouped (`evaluate.role_order`), else at the same time. `adapters`: role -> the identity of
    its adapter (the adapter roles)."""
    e = cfg.evaluate
    adapters = adapters or {}
    roles = [r for r, ss in scenarios_of.items() if ss]
    params = RequestSettings(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, max_tokens=e.max_tokens,
                            seed=cfg.sampling.seed, block_size=e.request_n)

    async def one(role: str) -> tuple[pa.Table, Path, RunReport]:
        spec = role_spec(cfg, role, adapters.get(role))
        store = SampleStore(role_dir(cfg, role, adapters.get(role)) / "samples")
        ss = scenarios_of[role]
        got = await collect_into(
            store, cfg, stage="evaluate", role=role, spec=spec, scenarios=ss, n=e.samples,
            instruction=e.instruction_for(role), params=params, max_tokens=_max_tokens(cfg, role), base_url=base_url,
            concurrency=e.concurrency, retry=retry, progress=_shown(progress, interleave_roles(cfg), roles),
            description=f"evaluate {role} ({spec['instruction']}, sampled): {len(ss)} scenarios x {e.samples}")
        return _only(store.read(), [role], [s.id for s in ss]), got.path, got.report

    return _per_role(roles, one, interleave_roles(cfg))


def _shown(progress, together: bool, roles: list[str]):
    """Several roles at once share one terminal: plain progress lines instead of several live displays."""
    return "lines" if together and len(roles) > 1 and progress is not False else progress


def exact_roles(cfg: ExperimentConfig, roles: list[str], scenarios: list[Scenario], *, base_url: str | None = None,
                progress: bool | None = None, retry: RetryPolicy | None = None,
                adapters: dict[str, dict | None] | None = None,
                lead: bool = False) -> dict[str, tuple[pa.Table, Path, RunReport]]:
    """One exact-mode call per (role, scenario) on the role's (answer-first) prompt, one store per role. `lead`:
    also the teacher's leading-answer mass on its own evaluation prompt, one call per 2x2 scenario, returned as
    `teacher_lead` (rows: role teacher, part "lead")."""
    e = cfg.evaluate
    adapters = adapters or {}
    # unit -> (role, its spec, its store, the scenarios, what the progress line says)
    units = {r: (r, role_spec(cfg, r, adapters.get(r)), ExactStore(role_dir(cfg, r, adapters.get(r)) / "exact"),
                 scenarios, f"evaluate {r} (exact): {len(scenarios)} scenarios") for r in roles}
    if lead and lead_scenarios(scenarios):
        ss = lead_scenarios(scenarios)
        units["teacher_lead"] = ("teacher", lead_spec(cfg), ExactStore(lead_dir(cfg) / "exact", part=LEAD_PART), ss,
                                 f"evaluate teacher lead (exact, {e.instruction_for('teacher')}): {len(ss)} 2x2 "
                                 f"scenarios")

    async def one(unit: str) -> tuple[pa.Table, Path, RunReport]:
        role, spec, store, ss, description = units[unit]
        got = await collect_into(
            store, cfg, stage="exact", role=role, spec=spec, scenarios=ss, instruction=e.instruction_for(role),
            base_url=base_url, concurrency=min(e.concurrency, 4), retry=retry,
            progress=_shown(progress, interleave_roles(cfg), list(units)), description=description)
        return _only(store.read(), [role], [s.id for s in ss]), got.path, got.report

    return _per_role(list(units), one, interleave_roles(cfg))


def _per_role(roles: list[str], one, together: bool) -> dict:
    """Run `one(role)` for every role: all at once (replicas on their own devices) or one after another (replicas
    sharing CPU cores slow each other down)."""
    async def main() -> dict:
        if together:
            return dict(zip(roles, await asyncio.gather(*(one(r) for r in roles))))
        return {r: await one(r) for r in roles}

    return asyncio.run(main())
