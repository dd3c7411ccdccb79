"""The sample store on its own: atomic shards, first-wins dedup, kill -9 at random moments while writing,
compaction, seeds, plans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tomtransfer.services.collector.store import (
    SAMPLE_SCHEMA,
    ExactStore,
    SampleStore,
    StoreError,
    check_manifest,
    plan_requests,
    sample_seed,
)

ROOT = Path(__file__).resolve().parents[1]


def rows(role: str, sid: str, idx, tag: str = "") -> list[dict]:
    return [dict(run_id="r", role=role, model="teacher", scenario_id=sid, family="in_sample", context="IR",
                 game="prison", sample_index=i, seed=7, messages="[]", response=f"C {tag}{i}",
                 answer="C", valid=True, latency_s=0.1, prompt_tokens=3, completion_tokens=2, finish_reason="stop",
                 request_n=5, choice_index=i % 5) for i in idx]


def test_schema_columns():
    names = SAMPLE_SCHEMA.names
    for col in ("run_id", "role", "model", "scenario_id", "family", "context", "game", "sample_index", "seed",
                "messages", "response", "answer", "valid", "latency_s", "prompt_tokens", "completion_tokens",
                "finish_reason"):
        assert col in names


def test_seeds_stable_and_distinct():
    assert sample_seed(0, "teacher", "IR_prison", 3) == sample_seed(0, "teacher", "IR_prison", 3)
    seeds = {sample_seed(0, r, s, i) for r in ("teacher", "student_base") for s in ("a", "b") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**31 for x in seeds)
    assert sample_seed(1, "teacher", "a", 0) != sample_seed(0, "teacher", "a", 0)


def test_plan_fixed_blocks():
    plan = plan_requests(set(), 12, 5, base_seed=0, role="teacher", scenario_id="a")
    assert [(r.start, r.n) for r in plan] == [(0, 5), (5, 5), (10, 2)]
    assert [r.seed for r in plan] == [sample_seed(0, "teacher", "a", i) for i in (0, 5, 10)]
    # A resume that lacks blocks 0 and 2 asks for exactly those, with the same (seed, n) as a fresh run.
    resumed = plan_requests(set(range(5, 10)), 12, 5, base_seed=0, role="teacher", scenario_id="a")
    assert resumed == [plan[0], plan[2]]
    # N grew after a partial last block: only the missing tail, seeded by its own first index.
    grown = plan_requests(set(range(12)), 15, 5, base_seed=0, role="teacher", scenario_id="a")
    assert [(r.start, r.n) for r in grown] == [(12, 3)]
    assert plan_requests(set(range(12)), 12, 5, base_seed=0, role="teacher", scenario_id="a") == []


def test_dedup_first_wins_and_compact(tmp_path):
    store = SampleStore(tmp_path)
    with store.writer():
        store.write(rows("teacher", "a", range(5), "first"))
        store.write(rows("teacher", "a", range(5), "second"))  # the same block again: must not duplicate
        store.write(rows("teacher", "b", range(3)))
        assert store.counts() == {("teacher", "a"): 5, ("teacher", "b"): 3}
        t = store.read()
        assert t.num_rows == 8
        assert [r for r in t.column("response").to_pylist() if r.startswith("C first")] == [f"C first{i}" for i in range(5)]
        path = store.compact()
        assert store.shard_paths() == [] and path.name == "samples.parquet"
        assert pq.read_table(path).num_rows == 8
        # The compacted file wins over a later shard with the same keys.
        store.write(rows("teacher", "a", range(5), "third"))
        assert store.read().num_rows == 8
        assert "C third0" not in store.read().column("response").to_pylist()
    # Only the compacted file is a *.parquet: a glob reader never sees a row twice.
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == ["samples.parquet"]


def test_crash_between_compact_rename_and_shard_deletion(tmp_path):
    """Compacted file present *and* the shards it merged: still exactly one row per key."""
    store = SampleStore(tmp_path)
    with store.writer():
        for b in range(3):
            store.write(rows("teacher", "a", range(5 * b, 5 * b + 5)))
        keep = {p: p.read_bytes() for p in store.shard_paths()}
        store.compact()
        for p, data in keep.items():  # as if killed right after the rename
            p.write_bytes(data)
        assert store.read().num_rows == 15 and store.counts() == {("teacher", "a"): 15}
        store.compact()
        assert store.shard_paths() == [] and pq.read_table(store.compact_path).num_rows == 15


def test_temporaries_never_read_and_cleaned(tmp_path):
    store = SampleStore(tmp_path)
    with store.writer():
        store.write(rows("teacher", "a", range(5)))
    half = store.shard_dir / ".tmp-000.shard.123.abcd"
    half.write_bytes(b"PAR1 half a file")
    assert store.read().num_rows == 5  # readers ignore temporaries
    with store.writer():  # the next writer removes them
        assert not half.exists()


def test_one_writer_at_a_time(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from tomtransfer.services.collector.store import SampleStore
        with SampleStore({str(tmp_path)!r}).writer():
            print("locked", flush=True)
            time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreError, match="another process"):
            with SampleStore(tmp_path).writer():
                pass
    finally:
        p.kill()
        p.wait()
    with SampleStore(tmp_path).writer():  # a killed writer's lock is gone with it
        pass


def test_manifest_refuses_other_settings(tmp_path):
    store = SampleStore(tmp_path)
    base = {"run_id": "x", "temperature": 0.8, "roles": {"teacher": {"model": "m1"}}}
    with store.writer():
        check_manifest(store, base)
        check_manifest(store, base)
        # Adding a role later is fine; changing a recorded one or a setting is not.
        merged = check_manifest(store, {**base, "roles": {"student_base": {"model": "s"}}})
        assert set(merged["roles"]) == {"teacher", "student_base"}
        with pytest.raises(StoreError, match="temperature"):
            check_manifest(store, {**base, "temperature": 0.7})
        with pytest.raises(StoreError, match="roles.teacher"):
            check_manifest(store, {**base, "roles": {"teacher": {"model": "m2"}}})


WRITER = textwrap.dedent("""
    import base64, os, random, sys
    from tomtransfer.services.collector.store import SampleStore
    sys.path.insert(0, {tests!r})
    from test_runner_store import rows
    # The payload: random text (base85 of random bytes) that zstd cannot shrink, so a write takes real time; drawn
    # once as 25 distinct 50 kB pieces (5 different ones per shard), so the process spends its time writing.
    pool = base64.b85encode(os.urandom(1_000_000)).decode()
    pieces = [pool[i:i + 50_000] for i in range(0, 25 * 50_000, 50_000)]
    store = SampleStore({root!r})
    with store.writer():
        first = sum(store.counts().values()) // 5  # resume: continue after the blocks already stored
        for b in range(first, {blocks}):
            block = rows("teacher", "s%d" % (b % 7), range(5 * (b // 7), 5 * (b // 7) + 5))
            for r, text in zip(block, random.sample(pieces, 5)):
                r["response"] = text
            store.write(block)
""")


@pytest.mark.slow  # 13 writer processes SIGKILLed at random moments: the crash tests' tier (tests/test_crash_kill9.py)
def test_kill9_at_random_moments_while_writing(tmp_path):
    """SIGKILL a writer of incompressible shards at seeded random moments, 12 times (some mid-write: a temporary
    file is left behind): every shard on disk is whole, temporaries are never read, and a rerun ends with
    exactly N per (role, scenario)."""
    import random
    import secrets

    seed = int(os.environ.get("TOMTRANSFER_CRASH_SEED") or secrets.randbelow(2**31))
    print(f"[crash] store writer: seed {seed} (replay: TOMTRANSFER_CRASH_SEED={seed})")
    rng = random.Random(f"{seed}-store")
    root = tmp_path / "store"
    store = SampleStore(root)
    writer = [sys.executable, "-c", WRITER.format(tests=str(ROOT / "tests"), root=str(root), blocks=100_000)]
    before, mid_write = 0, 0
    for attempt in range(12):
        p = subprocess.Popen(writer, cwd=ROOT)
        deadline = time.monotonic() + 60
        while len(store.shard_paths()) <= before and time.monotonic() < deadline:  # it is writing
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.1))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        temps = list(store.shard_dir.glob(".tmp-*"))
        mid_write += bool(temps)
        shards = store.shard_paths()
        assert len(shards) > before, f"seed {seed}"
        for s in shards:  # every final-named file is a complete shard of one 5-row block
            assert pq.read_table(s).num_rows == 5, f"seed {seed}: {s.name}"
        counts = store.counts()  # temporaries ignored
        assert sum(counts.values()) == 5 * len(shards) and all(c % 5 == 0 for c in counts.values()), f"seed {seed}"
        before = len(shards)
    assert mid_write >= 1, f"seed {seed}: no kill landed mid-write in 12"
    payload = b"".join(r.encode() for r in pq.read_table(shards[0]).column("response").to_pylist())
    assert len(pa.compress(payload, "zstd")) > 0.7 * len(payload), "the payload compresses: writes are too cheap"
    blocks = -(-before // 7) * 7 + 7  # whole rounds of the 7 scenarios, more than are stored
    subprocess.run([*writer[:2], WRITER.format(tests=str(ROOT / "tests"), root=str(root), blocks=blocks)],
                   cwd=ROOT, check=True)
    assert not list(store.shard_dir.glob(".tmp-*"))  # the next writer removed them
    assert set(store.counts().values()) == {5 * blocks // 7} and len(store.counts()) == 7
    with store.writer():
        store.compact()
    t = pq.read_table(root / "samples.parquet")
    keys = list(zip(t.column("scenario_id").to_pylist(), t.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == 5 * blocks
    print(f"[crash] store writer: 12 kills, {mid_write} mid-write, {before} whole shards kept, "
          f"{len(payload) // 1000} kB of random text per shard")


def test_exact_store_one_row_per_key(tmp_path):
    store = ExactStore(tmp_path)
    row = dict(run_id="r", role="teacher", model="teacher", scenario_id="a", family="in_sample", context="IR",
               game="prison", temperature=0.8, p_C=0.3, p_D=0.6, valid_mass=0.9, messages="[]")
    with store.writer():
        store.write([row])
        store.write([{**row, "p_C": 0.5}])
        assert store.done() == {("teacher", "a")}
        store.compact()
    t = pq.read_table(tmp_path / "exact.parquet")
    assert t.num_rows == 1 and t.column("p_C").to_pylist() == [0.3]


def test_job_order_groups_roles_on_shared_cpu():
    """Local CPU replicas are asked one role after the other (they share the cores); GPU replicas interleaved;
    an explicit `evaluate.role_order` wins. The jobs are the same set either way."""
    from tomtransfer.shared.config import parse_config
    from tomtransfer.shared.scenarios import default_catalog
    from tomtransfer.services.collector.jobs import interleave_roles, jobs_for

    def cfg(teacher: dict, order: str = "auto"):
        return parse_config({"models": {"teacher": {"model": "t", **teacher}, "student": {"model": "s"}},
                             "evaluate": {"role_order": order}})

    cpu, gpu = cfg({}), cfg({"engine": "vllm", "num_gpus": 1})
    assert interleave_roles(cpu) is False and interleave_roles(gpu) is True
    assert interleave_roles(cfg({}, "interleaved")) is True and interleave_roles(cfg({"num_gpus": 1}, "grouped")) is False
    scenarios = list(default_catalog().scenarios.values())[:3]
    roles = ["teacher", "student_base"]
    grouped = [(j.role, j.scenario.id) for j in jobs_for(cpu, roles, scenarios, 1, "answer_only", False)]
    mixed = [(j.role, j.scenario.id) for j in jobs_for(cpu, roles, scenarios, 1, "answer_only", True)]
    assert [r for r, _ in grouped] == ["teacher"] * 3 + ["student_base"] * 3
    assert [r for r, _ in mixed] == ["teacher", "student_base"] * 3
    assert sorted(grouped) == sorted(mixed)
