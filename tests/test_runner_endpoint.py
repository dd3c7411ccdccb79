"""The sampling runner against a real HTTP endpoint (the project's engine on tiny models), directly and through a
real fault-injecting reverse proxy: exact counts, resume, 20 % failing requests, a dead endpoint, 4xx.

Starts servers: run inside a private network namespace (`scripts/in-netns`, as `make test` does).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from types import SimpleNamespace

from tomtransfer.services.collector.runner import EndpointError, RetryPolicy, RequestSettings, sample_async
from tomtransfer.services.collector.store import SampleStore, atomic_write_parquet, check_manifest, sample_seed
from tomtransfer.services.collector.jobs import jobs_for, role_identity, run_id_for, select_scenarios
from tomtransfer.services.evaluator.collect import exact_roles
from tomtransfer.shared.config import parse_config
from tests.fault_proxy import FaultProxy

pytest_plugins = ["tests.fixtures.llm_endpoint"]
pytestmark = pytest.mark.netns

SCENARIOS = ["IR_prison", "team_staghunt", "pgg"]
ROLES = ["teacher", "student_base", "student_finetuned"]
MODELS = {"teacher": "teacher", "student_base": "student", "student_finetuned": "student:tt"}
N, BLOCK = 12, 4


def config(tmp_path, url, adapter="tt", **evaluate):
    return parse_config({
        "name": "runner-test",
        "output_dir": str(tmp_path),
        "models": {"teacher": {"model": "tiny-teacher"}, "student": {"model": "tiny-student"}},
        "sampling": {"temperature": 0.9, "seed": 11},
        "scenarios": {"ids": SCENARIOS},
        "serving": {"base_url": url},
        "training": {"adapter_name": adapter},
        # every role on the answer-only prompt: these tests are about the runner, not the protocol
        "evaluate": {"roles": ROLES, "samples": N, "request_n": BLOCK, "max_tokens": 4, "concurrency": 4,
                     "protocol": "answer_only", **evaluate},
    })


def collect_samples(cfg, roles=None, progress=False, retry=None):
    """Every selected (role, scenario) into ONE store through the runner (these tests are about the runner and
    the store: resume, faults, exact counts; the evaluate stage's per-role stores are tested end to end)."""
    e = cfg.evaluate
    roles = list(roles or e.roles)
    scenarios = select_scenarios(cfg, list(e.families))
    store = SampleStore(cfg.run_dir / "evaluate" / "samples")
    params = RequestSettings(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, max_tokens=e.max_tokens,
                            seed=cfg.sampling.seed, block_size=e.request_n)
    run_id = run_id_for("evaluate", cfg, {"test": 1})
    with store.writer():
        check_manifest(store, {"version": 1, "run_id": run_id, "roles": {r: role_identity(cfg, r) for r in roles}})
        report = asyncio.run(sample_async(
            store, jobs_for(cfg, roles, scenarios, e.samples, "answer_only"), base_url=cfg.serving.base_url,
            params=params, run_id=run_id, concurrency=e.concurrency, retry=retry or RetryPolicy(), progress=progress))
        path = store.compact()
    t = store.read()
    t = t.filter(pc.is_in(t["role"], value_set=pa.array(roles)))
    return SimpleNamespace(table=t, path=path, report=report)


def collect_exact(cfg, roles, **kw):
    (table, path, report), = exact_roles(cfg, roles, select_scenarios(cfg, list(cfg.evaluate.families)), **kw).values()
    return SimpleNamespace(table=table, path=path, report=report)


def comparable(table: pa.Table) -> list[dict]:
    """The rows minus what legitimately differs between runs (wall-clock latency)."""
    return table.drop_columns(["latency_s"]).sort_by([("role", "ascending"), ("scenario_id", "ascending"),
                                                      ("sample_index", "ascending")]).to_pylist()


def assert_exact(table: pa.Table, n: int = N) -> None:
    keys = list(zip(table.column("role").to_pylist(), table.column("scenario_id").to_pylist(),
                    table.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate samples"
    for role in ROLES:
        for sid in SCENARIOS:
            got = sorted(i for r, s, i in keys if r == role and s == sid)
            assert got == list(range(n)), f"{role}/{sid}: {len(got)} samples"


@pytest.fixture(scope="module")
def reference(llm_endpoint, tmp_path_factory):
    """An uninterrupted, fault-free run: what every other run must reproduce row for row."""
    res = collect_samples(config(tmp_path_factory.mktemp("reference"), llm_endpoint.url), progress=False)
    return res


def test_counts_exact_and_seeds(reference, llm_endpoint):
    t = reference.table
    assert_exact(t)
    assert reference.report.requests == len(ROLES) * len(SCENARIOS) * 3  # 12 samples in blocks of 4
    # The compacted file other stages read holds every sample exactly once, and nothing else.
    assert pq.read_table(reference.path).num_rows == len(ROLES) * len(SCENARIOS) * N
    for row in t.to_pylist():
        first = row["sample_index"] - row["sample_index"] % BLOCK
        assert row["seed"] == sample_seed(11, row["role"], row["scenario_id"], first)
        assert row["request_n"] == BLOCK and row["choice_index"] == row["sample_index"] % BLOCK
        assert row["model"] == MODELS[row["role"]]
        assert row["valid"] == (row["answer"] is not None)
        if row["scenario_id"] == "pgg" and row["answer"] is not None:
            assert 0 <= float(row["answer"]) <= 10
        assert row["prompt_tokens"] > 0 and row["finish_reason"] in ("stop", "length")
        # Per-sample token counts need a per-choice count from the server (an extension); else null, never guessed.
        assert row["completion_tokens"] is None or 0 <= row["completion_tokens"] <= 4
    # A rerun finds everything in place and sends nothing.
    again = collect_samples(config(reference.path.parents[3], llm_endpoint.url), progress=False)
    assert again.report.requests == 0 and again.report.already == len(t)


def test_paper_bug_regression_double_append_and_lost_samples(reference, llm_endpoint, tmp_path):
    """The paper's code appended every answer twice and lost samples in two scenarios. Give the store exactly
    that state: every row twice, and a block missing in two scenarios. Reading counts each sample once, and a
    rerun asks for the two lost blocks only, ending with exactly N per (role, scenario), no duplicate."""
    cfg = config(tmp_path, llm_endpoint.url)
    store = SampleStore(cfg.run_dir / "evaluate" / "samples")
    store.root.mkdir(parents=True)
    full = reference.table
    lost = [("teacher", "IR_prison", 4), ("student_base", "pgg", 8)]  # (role, scenario, block start)
    keep = [not any(r["role"] == ro and r["scenario_id"] == s and b <= r["sample_index"] < b + BLOCK for ro, s, b in lost)
            for r in full.select(["role", "scenario_id", "sample_index"]).to_pylist()]
    damaged = full.filter(pa.array(keep))
    atomic_write_parquet(pa.concat_tables([damaged, damaged]), store.compact_path)  # every answer twice
    import shutil

    shutil.copy(reference.path.parent / "manifest.json", store.root / "manifest.json")
    counts = store.counts()
    assert counts[("teacher", "IR_prison")] == N - BLOCK and counts[("student_base", "pgg")] == N - BLOCK
    assert sum(counts.values()) == damaged.num_rows  # duplicates never counted
    res = collect_samples(cfg, progress=False)
    assert res.report.requests == 2 and res.report.written == 2 * BLOCK
    assert_exact(res.table)
    assert pq.read_table(res.path).num_rows == full.num_rows  # compaction dropped the doubled rows
    assert comparable(res.table) == comparable(full)


def test_twenty_percent_failing_requests(reference, llm_endpoint, tmp_path):
    """A real proxy fails 20 % of requests (503 before, 502 after the upstream did the work, connection reset):
    the run completes with exact counts and the same rows as the fault-free run."""
    with FaultProxy(llm_endpoint.url, fail_rate=0.2, seed=3) as proxy:
        res = collect_samples(config(tmp_path, proxy.url), progress=True)  # the progress display path too
    assert proxy.stats["fault_503"] + proxy.stats["fault_502"] + proxy.stats["fault_reset"] >= 2
    assert res.report.retries >= 2
    assert_exact(res.table)
    assert comparable(res.table) == comparable(reference.table)


def test_dead_endpoint_clear_error_within_60s_and_resume(reference, llm_endpoint, tmp_path):
    """The endpoint dies mid-run: a one-line error well within 60 s (default retry policy), completed blocks kept;
    once it is back, a rerun fills only the rest and matches the uninterrupted run."""
    cfg = config(tmp_path, "")
    store = SampleStore(cfg.run_dir / "evaluate" / "samples")
    killed_at: list[float] = []
    with FaultProxy(llm_endpoint.url, delay_s=0.15) as proxy:
        cfg = config(tmp_path, proxy.url, concurrency=2)

        def killer() -> None:
            while len(store.shard_paths()) < 3:
                time.sleep(0.01)
            proxy.kill()
            killed_at.append(time.monotonic())

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        with pytest.raises(EndpointError) as err:
            collect_samples(cfg, progress=False)
        elapsed = time.monotonic() - killed_at[0]
        msg = str(err.value)
        assert elapsed < 60, f"took {elapsed:.1f} s to give up"
        assert "\n" not in msg and "is down" in msg and "rerun" in msg and proxy.url in msg, msg
        kept = store.counts()
        assert sum(kept.values()) >= 3 * BLOCK and all(c % BLOCK == 0 for c in kept.values())
        assert sum(kept.values()) < len(ROLES) * len(SCENARIOS) * N
        proxy.revive()
        res = collect_samples(cfg, progress=False)
    assert res.report.already == sum(kept.values())
    assert_exact(res.table)
    assert comparable(res.table) == comparable(reference.table)
    # ... hence the evaluation metrics (domain core, via the evaluator) are those of the uninterrupted run.
    from tomtransfer.services.evaluator.scoring import evaluate_samples

    def metrics(t):
        return evaluate_samples(t.to_pandas(), expected_samples=N, n_resamples=200).flat_metrics()

    got = metrics(res.table)
    assert got == metrics(reference.table) and any(k.startswith("invalid_rate.") for k in got)


def test_hung_endpoint_detected_by_probe_and_slow_endpoint_is_not(reference, llm_endpoint, tmp_path):
    """An endpoint that accepts connections and never answers is found by the health probe (here with a
    scaled-down policy; the defaults give ~50 s), while one that is merely slow is left alone."""
    fast = RetryPolicy(stall_after_s=1.0, probe_every_s=0.25, probe_timeout_s=0.5, give_up_after_s=1.5)
    with FaultProxy(llm_endpoint.url, delay_s=2.5) as slow:  # every block takes longer than stall_after_s
        res = collect_samples(config(tmp_path / "slow", slow.url, roles=["teacher"], concurrency=9), progress=False,
                              retry=fast)
    assert res.report.retries == 0 and slow.stats["requests"] > 9  # the probes came, and were answered
    assert comparable(res.table) == comparable(reference.table.filter(pc.equal(reference.table["role"], "teacher")))
    with FaultProxy(llm_endpoint.url) as proxy:
        proxy.frozen = True
        t0 = time.monotonic()
        with pytest.raises(EndpointError, match="is down.*health probe"):
            collect_samples(config(tmp_path / "hung", proxy.url, roles=["teacher"]), progress=False, retry=fast)
        assert time.monotonic() - t0 < 10


def test_4xx_is_an_immediate_clear_error(llm_endpoint, tmp_path):
    # An adapter the server does not have: HTTP 404, no retries.
    t0 = time.monotonic()
    with pytest.raises(EndpointError) as err:
        collect_samples(config(tmp_path / "a", llm_endpoint.url, adapter="nope", roles=["student_finetuned"]),
                        progress=False)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and "rejected" in msg and "HTTP 404" in msg and "student:nope" in msg, msg
    # n over the server's cap: HTTP 400 with the server's own explanation.
    with pytest.raises(EndpointError, match=r"HTTP 400: n=100 is over the cap of 64"):
        collect_samples(config(tmp_path / "b", llm_endpoint.url, request_n=100, samples=100), progress=False)


def test_exact_estimator_rows(llm_endpoint, tmp_path):
    """Exact mode: one row per (role, scenario) from `POST /v1/exact`, resumable. (Kept small: exact mode on a
    random-weight model explores many undecided prefixes and takes seconds per call on CPU.)"""
    cfg = parse_config({**config(tmp_path, llm_endpoint.url).model_dump(mode="json"),
                        "scenarios": {"ids": ["IR_prison", "pgg"]}})
    res = collect_exact(cfg, roles=["teacher"], progress=False)
    rows = {r["scenario_id"]: r for r in res.table.to_pylist()}
    assert set(rows) == {"IR_prison", "pgg"} and all(r["role"] == "teacher" for r in rows.values())
    r = rows["IR_prison"]
    assert r["p_C"] >= 0 and r["p_D"] >= 0 and r["pgg_dist"] is None
    assert r["valid_mass"] == pytest.approx(r["p_C"] + r["p_D"], abs=1e-9)
    if r["valid_mass"] > 0:
        assert r["p_C_given_valid"] == pytest.approx(r["p_C"] / r["valid_mass"])
    g = rows["pgg"]
    dist = json.loads(g["pgg_dist"])
    assert len(dist) == 11 and g["p_C"] is None
    assert sum(dist) == pytest.approx(g["valid_mass"], abs=1e-9)
    assert pq.read_table(res.path).num_rows == 2
    again = collect_exact(cfg, roles=["teacher"], progress=False)
    assert again.report.requests == 0 and again.report.already == 2



def test_exact_roles_run_beside_the_sampled_teacher_only_when_roles_interleave(llm_endpoint, tmp_path):
    """The paper's protocol (teacher sampled with motivations, students in exact mode): with replicas on their own
    devices (`role_order: interleaved`) the students' exact calls do not wait for the teacher's samples; with
    replicas sharing cores (`grouped`) they come after them. The rows are the same either way."""
    from tomtransfer.services.evaluator.collect import collect

    got = {}
    for order in ("interleaved", "grouped"):
        proxy = FaultProxy(llm_endpoint.url, paths=("/v1/chat/completions",), delay_s=0.5).start()
        try:
            cfg = parse_config({**config(tmp_path / order, proxy.url).model_dump(mode="json"),
                                "scenarios": {"ids": ["IR_prison", "team_staghunt"]},
                                "evaluate": {"roles": ROLES, "samples": N, "request_n": BLOCK, "concurrency": 4,
                                             "protocol": "paper", "estimator": "exact", "motivation_max_tokens": 6,
                                             "role_order": order}})
            ev = got[order] = collect(cfg, progress=False)
        finally:
            proxy.stop()
        chat = [(t0, t1) for p, t0, t1 in proxy.timeline if p == "/v1/chat/completions"]
        exact = [(t0, t1) for p, t0, t1 in proxy.timeline if p == "/v1/exact"]
        # 2 students x 2 scenarios, and the teacher's leading-answer mass (evaluate.teacher_lead, on by default with
        # the exact estimator) on each 2x2 scenario
        assert len(chat) == 2 * N // BLOCK and len(exact) == 3 * 2
        first_exact, last_chat = min(t0 for t0, _ in exact), max(t1 for _, t1 in chat)
        assert (first_exact < last_chat) if order == "interleaved" else (first_exact >= last_chat), order
        assert sorted(set(ev.samples["role"])) == ["teacher"] and len(ev.samples) == 2 * N
        # the lead rows: role teacher, part "lead", on the teacher's own (motivated) prompt; the students' part null
        lead = ev.exact[ev.exact["role"] == "teacher"]
        assert sorted(lead["scenario_id"]) == ["IR_prison", "team_staghunt"] and (lead["part"] == "lead").all()
        assert (lead["valid_mass"] - lead["p_C"] - lead["p_D"]).abs().max() < 1e-9
        assert ev.exact[ev.exact["role"] != "teacher"]["part"].isna().all()
        for r in lead.itertuples():  # the same prompt as the teacher's samples of that scenario
            same = ev.samples[ev.samples["scenario_id"] == r.scenario_id]["messages"]
            assert json.loads(r.messages) == json.loads(same.iloc[0])
        assert any("teacher_lead:" in line for line in ev.store_lines)
    key = ["role", "scenario_id"]
    a, b = (got[o].exact.sort_values(key).reset_index(drop=True) for o in ("interleaved", "grouped"))
    assert a[key + ["p_C", "p_D", "valid_mass"]].equals(b[key + ["p_C", "p_D", "valid_mass"]])
    sa, sb = (got[o].samples.sort_values(["scenario_id", "sample_index"]).reset_index(drop=True)
              for o in ("interleaved", "grouped"))
    assert sa[["scenario_id", "sample_index", "response"]].equals(sb[["scenario_id", "sample_index", "response"]])
