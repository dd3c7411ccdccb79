"""The collection sequence has one home (`services.collector.collection.collect_into`): every caller - the generate
stage, the evaluated roles (sampled and exact, the teacher's leading answers), the soft-label set's exact rows -
records the same manifest version, run ids from the same inputs as before, and the jobs it asked for. The runner
itself is replaced here (its requests are tested against real endpoints in test_runner_endpoint.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tomtransfer.shared.config import parse_config
from tomtransfer.shared.samples import LEAD_PART

from tomtransfer.services.collector import collection
from tomtransfer.services.collector.jobs import role_identity, run_id_for, select_scenarios
from tomtransfer.services.collector.runner import RequestSettings, RunReport
from tomtransfer.services.collector.store import MANIFEST_VERSION, ExactStore, SampleStore, StoreError, check_manifest

BASE = {"name": "col", "models": {"teacher": {"model": "hub/teacher"}, "student": {"model": "hub/student"}},
        "scenarios": {"ids": ["IR_prison", "IR_staghunt"]}, "serving": {"base_url": "http://127.0.0.1:1/"}}


@pytest.fixture
def calls(monkeypatch):
    """The runner's calls, recorded instead of sent."""
    seen: list[dict] = []

    def fake(kind: str):
        async def run(store, jobs, **kw):
            seen.append({"kind": kind, "store": store, "jobs": jobs, **kw})
            return RunReport(requests=len(jobs))
        return run

    monkeypatch.setattr(collection, "sample_async", fake("sample"))
    monkeypatch.setattr(collection, "exact_async", fake("exact"))
    return seen


def test_sampled_store_gets_manifest_run_id_and_jobs(tmp_path, calls):
    cfg = parse_config({**BASE, "output_dir": str(tmp_path)})
    scenarios = select_scenarios(cfg, list(cfg.evaluate.families))
    spec = {"model": "m", "instruction": "answer_only"}
    store = SampleStore(tmp_path / "s")
    params = RequestSettings(temperature=0.7, top_p=1.0, max_tokens=5, seed=1, block_size=2)
    got = asyncio.run(collection.collect_into(
        store, cfg, stage="evaluate", role="student_base", spec=spec, scenarios=scenarios, n=3,
        instruction="answer_only", params=params, max_tokens=5, concurrency=2, description="d"))
    assert got.run_id == run_id_for("evaluate", cfg, spec)
    assert json.loads(store.manifest_path.read_text()) == {"version": MANIFEST_VERSION, "run_id": got.run_id,
                                                           "roles": {"student_base": spec}}
    (call,) = calls
    assert call["kind"] == "sample" and call["params"] is params and call["base_url"] == "http://127.0.0.1:1"
    assert [(j.role, j.scenario.id, j.n, j.max_tokens) for j in call["jobs"]] == [
        ("student_base", s.id, 3, 5) for s in scenarios]
    assert got.path == store.compact_path and got.report.requests == len(scenarios)


def test_generate_settings_go_to_manifest_and_run_id(tmp_path, calls):
    """The generate stage's manifest holds its settings beside the run id; the run id hashes the settings with the
    teacher's identity under "teacher" (as it always did: a resumed store keeps its id)."""
    cfg = parse_config({**BASE, "output_dir": str(tmp_path)})
    scenarios = select_scenarios(cfg, list(cfg.generate.families))
    teacher = role_identity(cfg, "teacher")
    settings = {"stage": "generate", "temperature": 0.8}
    store = SampleStore(tmp_path / "g")
    got = asyncio.run(collection.collect_into(
        store, cfg, stage="generate", role="teacher", spec=teacher, settings=settings, scenarios=scenarios, n=2,
        instruction=cfg.generate.instruction, params=RequestSettings(temperature=0.8, top_p=1.0, max_tokens=8,
                                                                     seed=0, block_size=2),
        concurrency=1, description="d"))
    assert got.run_id == run_id_for("generate", cfg, {**settings, "teacher": teacher})
    assert store.manifest() == {"version": MANIFEST_VERSION, "run_id": got.run_id, **settings,
                                "roles": {"teacher": teacher}}
    assert all(j.max_tokens is None for j in calls[0]["jobs"])


def test_exact_store_one_call_per_scenario_at_the_sampling_temperature(tmp_path, calls):
    cfg = parse_config({**BASE, "output_dir": str(tmp_path), "sampling": {"temperature": 0.6}})
    scenarios = select_scenarios(cfg, list(cfg.evaluate.families))
    store = ExactStore(tmp_path / "e", part=LEAD_PART)
    asyncio.run(collection.collect_into(store, cfg, stage="exact", role="teacher", spec={"x": 1}, scenarios=scenarios,
                                        instruction="answer_motivation", base_url="http://127.0.0.1:2/v1/",
                                        concurrency=4, description="d"))
    (call,) = calls
    assert call["kind"] == "exact" and call["temperature"] == 0.6 and call["base_url"] == "http://127.0.0.1:2/v1"
    assert [j.n for j in call["jobs"]] == [1] * len(scenarios)


def test_stores_recorded_before_the_one_version_still_resume(tmp_path):
    """Generate and soft-label stores recorded version 1, evaluate stores 3, for the same manifest: both resume."""
    base = {"run_id": "r", "roles": {"teacher": {"model": "m"}}}
    for old in (1, 3):
        store = SampleStore(tmp_path / str(old))
        with store.writer():
            check_manifest(store, {"version": old, **base})
            assert check_manifest(store, {"version": MANIFEST_VERSION, **base})["version"] == old
    store = SampleStore(tmp_path / "other")
    with store.writer():
        check_manifest(store, {"version": 2, **base})
        with pytest.raises(StoreError, match="version"):
            check_manifest(store, {"version": MANIFEST_VERSION, **base})
