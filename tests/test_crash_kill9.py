"""kill -9 at random moments of `generate` and of `evaluate`, then a rerun: exactly N per (role, scenario), no
duplicate, and the same rows and metrics as an uninterrupted run.

- Real processes: the `generate` command (`python -m services.cli generate`) and the `evaluate` command
  (`python -m services.cli evaluate`, MLflow logging included), against the tiny random-weight models served by
  the project's app (`llm_endpoint`), SIGKILLed `KILLS` times (22 in all) at moments drawn from a seeded RNG.
  The seed is printed and in every failure message; `TOMTRANSFER_CRASH_SEED=<seed>` replays the schedule.
- Two kinds of moment, drawn per kill: "random" (a uniform delay after the process starts, up to its first
  write plus two rounds of requests as timed on the uninterrupted run: start-up, MLflow, requests in flight,
  and writes) and "write" (the k-th store write of that process, k in 1..3, killed as soon as its
  temporary file appears, i.e. between `open()` and the atomic rename; every run stops there at the latest,
  so each kill costs a few blocks and the loop never runs out of work). A kill that leaves a `.tmp-*` file
  behind provably landed mid-write; each test requires at least one (its last kill aims at a write if none
  has landed in one by then).
- Random-text payloads: the models have random weights, so at temperature 1.5 with 128 tokens a sample is a
  few hundred bytes of random tokens, 32 of them per shard (asserted: zstd keeps more than 40 % of it, where
  the old padding kept 0.1 %; sizes printed), and a write (encode + fsync) takes milliseconds.
  (`tests/test_runner_store.py` kills the store writer alone, with 250 kB shards.)
- After every kill: every file under a final shard name is one whole request block, holding exactly the rows
  the uninterrupted run has for it (the server reproduces (seed, n)), and no key is in two shards.
- After the last kill, one rerun to the end: exactly N per (role, scenario), no duplicate, no temporary file
  left, the same rows and the same metrics (training set hash and per-scenario rates for generate, every
  metric logged to MLflow for evaluate) as the uninterrupted run.

Starts servers: run inside a private network namespace (`scripts/in-netns`, as `make test` does).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tomtransfer.services.collector.store import EXACT_KEY, SAMPLE_KEY, SampleStore

pytest_plugins = ["tests.fixtures.llm_endpoint", "tests.fixtures.mlflow_server"]
pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TOMTRANSFER_CRASH_SEED") or secrets.randbelow(2**31))
KILLS = {"generate": 14, "evaluate": 8}  # an evaluate run starts slower (MLflow): fewer of them
TMP = ".tmp-"  # services.collector.store writes every store file under this prefix, then renames it
VOLATILE = {"latency_s"}  # the only sample column allowed to differ between two runs of the same request


def seeded(name: str) -> random.Random:
    """One RNG per test, from the printed seed (independent of test order)."""
    print(f"[crash] {name}: seed {SEED} (replay: TOMTRANSFER_CRASH_SEED={SEED})", flush=True)
    return random.Random(f"{SEED}-{name}")


# ------------------------------------------------------------------------------------------ the killer
@dataclass
class Kill:
    mode: str  # "random" or "write"
    after_s: float  # since the process started
    temps_left: list[str]  # temporary store files it left behind (a write it was in the middle of)


def temps_in(stores: list[Path]) -> set[Path]:
    """The temporary files in store folders (and their shards/)."""
    out: set[Path] = set()
    for d in stores:
        for sub in (d, d / "shards"):
            try:
                out.update(Path(e.path) for e in os.scandir(sub) if e.name.startswith(TMP))
            except FileNotFoundError:
                pass
    return out


class Watch:
    """The store folders `find()` lists (they appear during a run), re-listed every 50 ms so polling stays cheap."""

    def __init__(self, find):
        self.find, self.dirs, self.at = find, [], 0.0

    def temps(self) -> set[Path]:
        if time.monotonic() - self.at > 0.05:
            self.dirs, self.at = self.find(), time.monotonic()
        return temps_in(self.dirs)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=fh)


def random_span(cmd: list[str], find, log: Path, rounds: int) -> float:
    """Run `cmd` (the uninterrupted reference) to the end and time it: its first store write plus two rounds of
    requests, the span random kill moments are drawn from."""
    watch = Watch(find)
    p = start(cmd, log)
    t0, first = time.monotonic(), None
    while p.poll() is None:
        if first is None and watch.temps():
            first = time.monotonic() - t0
        time.sleep(0.005)
    total = time.monotonic() - t0
    assert p.returncode == 0, log.read_text()[-3000:]
    first = total if first is None else first
    return first + 2 * (total - first) / rounds


class Killer:
    """Runs `cmd` and SIGKILLs it at a moment drawn from `rng`: a uniform delay in [0.1 s, span_s] after it starts
    ("random") or, if that comes first, the moment the temporary file of its k-th store write appears, k in 1..3
    ("write": between `open()` and the atomic rename). Half the runs have no delay, only k. Capping every run at
    k writes keeps each kill's progress small, so the loop never runs out of work."""

    def __init__(self, cmd: list[str], find, rng: random.Random, log: Path, span_s: float):
        self.cmd, self.watch, self.rng, self.log, self.span_s = cmd, Watch(find), rng, log, span_s
        self.kills: list[Kill] = []
        self.finished = 0  # runs that ended before their kill moment

    def run_once(self, aim_at_write: bool = False) -> Kill | None:
        delay = self.rng.uniform(0.1, self.span_s) if self.rng.random() < 0.5 else float("inf")
        delay = float("inf") if aim_at_write else delay
        nth_write = self.rng.randint(1, 3)
        before = self.watch.temps()  # a previous kill's leftovers (removed by the next writer): not this run's
        p = start(self.cmd, self.log)
        t0 = time.monotonic()
        seen: set[Path] = set()
        while p.poll() is None and len(seen) < nth_write and time.monotonic() - t0 < min(delay, 300):
            seen |= self.watch.temps() - before
            time.sleep(0.0005)
        if p.poll() is not None:
            self.finished += 1
            return None
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        self.watch.at = 0.0
        mode = "write" if len(seen) >= nth_write else "random"
        kill = Kill(mode, time.monotonic() - t0, sorted(t.name for t in self.watch.temps() - before))
        self.kills.append(kill)
        return kill

    def summary(self) -> str:
        modes = Counter(k.mode for k in self.kills)
        mid = sum(1 for k in self.kills if k.temps_left)
        return (f"seed {SEED}: {len(self.kills)} kills ({dict(modes)}), {mid} mid-write, {self.finished} runs "
                f"finished before their kill moment, random moments in [0.1, {self.span_s:.1f}] s")


# ------------------------------------------------------------------------------------------ checks
def key_of(row: dict, key) -> tuple:
    return tuple(row[k] for k in key)


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in VOLATILE}


def reference_rows(path: Path, key) -> dict[tuple, dict]:
    return {key_of(r, key): stable(r) for r in pq.read_table(path).to_pylist()}


def check_partial(store_root: Path, key, reference: dict[tuple, dict], block: int | None, why: str,
                  compact_name: str = "samples.parquet") -> int:
    """After a kill: every final-named shard is whole, one request block (sampled stores), rows equal to the
    uninterrupted run's, no key in two shards; a store that finished and compacted holds the same rows in its
    compacted file. Returns the rows kept (shards and compacted file: compaction moves rows, it keeps them)."""
    store = SampleStore(store_root)  # only its file listing is used: the schema does not matter here
    seen: set[tuple] = set()
    compacted_keys: set[tuple] = set()
    compacted = store_root / compact_name
    if compacted.is_file():  # a kill between the compacted file's rename and the shards' removal leaves both
        rows = pq.read_table(compacted).to_pylist()
        keys = [key_of(r, key) for r in rows]
        assert len(keys) == len(set(keys)), f"{why}: {compact_name} holds a row twice"
        for k, r in zip(keys, rows):
            assert stable(r) == reference[k], f"{why}: {compact_name} row {k} differs from the uninterrupted run"
        compacted_keys = set(keys)
    for shard in store.shard_paths():
        rows = pq.read_table(shard).to_pylist()  # raises on a torn file
        keys = [key_of(r, key) for r in rows]
        assert not seen & set(keys), f"{why}: {shard.name} repeats rows already in another shard"
        seen |= set(keys)
        if block is not None:  # (role, scenario, sample_index): one block [b*k, (b+1)*k) of one pair
            idx = sorted(k[2] for k in keys)
            assert len({k[:2] for k in keys}) == 1 and idx[0] % block == 0 and idx == list(
                range(idx[0], idx[0] + block)), f"{why}: {shard.name} is not one whole block: {idx}"
        for k, r in zip(keys, rows):
            assert stable(r) == reference[k], f"{why}: {shard.name} row {k} differs from the uninterrupted run"
    return len(seen | compacted_keys)


def check_final(store_root: Path, compact_name: str, key, reference: dict[tuple, dict], n_per_pair: int, why: str):
    assert not list(store_root.rglob(f"{TMP}*")), f"{why}: temporary files left after the rerun"
    assert SampleStore(store_root).shard_paths() == [], f"{why}: shards left after compaction"
    rows = pq.read_table(store_root / compact_name).to_pylist()
    keys = [key_of(r, key) for r in rows]
    assert len(keys) == len(set(keys)), f"{why}: duplicate rows"
    assert set(Counter(k[:2] for k in keys).values()) == {n_per_pair}, f"{why}: not exactly N per (role, scenario)"
    assert {k: stable(r) for k, r in zip(keys, rows)} == reference, f"{why}: rows differ from the uninterrupted run"


def incompressible(store_root: Path, block: int) -> str:
    """The sampled payload is random text: random tokens of the tiny models' 600-token vocabulary, which zstd
    shrinks about 2x (the information is in the token choice, ~9 bits per ~2.5 characters), never to nothing
    (the old padding, "x" * 20000, shrank 1000x). Returns a line on its size."""
    texts = pq.read_table(store_root / "samples.parquet", columns=["response"]).column("response").to_pylist()
    raw = "".join(texts).encode()
    ratio = len(pa.compress(raw, "zstd")) / len(raw)
    assert ratio > 0.4, f"{store_root}: the responses compress to {ratio:.0%}: not a random-text payload"
    return f"{len(raw) // len(texts)} bytes of text per sample, {block * len(raw) // len(texts) // 1000} kB per " \
           f"shard, zstd keeps {ratio:.0%}"


def kill_loop(killer: Killer, kills: int, check) -> None:
    """`kills` kills (runs that finish first do not count), checking the stores after each: `check(why)` returns
    the rows kept, which never go down (a resumed run keeps what was stored)."""
    attempts, kept = 0, 0
    while len(killer.kills) < kills:
        attempts += 1
        assert attempts <= 3 * kills, f"{killer.summary()}: too many runs finished before their kill moment"
        last_chance = len(killer.kills) == kills - 1 and not any(k.temps_left for k in killer.kills)
        kill = killer.run_once(aim_at_write=last_chance)  # the last kill aims at a write if none landed in one
        if kill is not None:
            why = f"{killer.summary()}; after kill {len(killer.kills)} ({kill})"
            now = check(why)
            assert now >= kept, f"{why}: {kept} rows were kept before, {now} now"
            kept = now
    print(f"[crash] {killer.summary()}", flush=True)
    for k in killer.kills:
        print(f"[crash]   {k.mode:6} at {k.after_s:6.2f} s  left {k.temps_left or '-'}", flush=True)
    assert any(k.temps_left for k in killer.kills), f"{killer.summary()}: no kill landed mid-write"


# ------------------------------------------------------------------------------------------ generate
GEN_SCENARIOS = ["IR_prison", "biz_staghunt", "environment_delight", "pgg"]
GEN_N, GEN_BLOCK, GEN_CONCURRENCY = 256, 32, 2  # 32 blocks: 14 kills lose a few blocks each, never all


def generate_config(path: Path, out: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "crash-gen",
        "output_dir": str(out),
        "models": {"teacher": {"model": "tiny-teacher"}, "student": {"model": "tiny-student"}},
        # temperature 1.5 on random weights: random text, the payload
        "sampling": {"temperature": 1.5, "max_tokens": 128, "seed": SEED % 10_000},
        "scenarios": {"ids": GEN_SCENARIOS},
        "serving": {"base_url": url},
        "generate": {"samples": GEN_N, "request_n": GEN_BLOCK, "concurrency": GEN_CONCURRENCY,
                     "valid_policy": "all", "families": ["in_sample", "oos_context", "pgg"]},
    }))
    return path


def generate_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "tomtransfer.services.cli", "generate", "--config", str(cfg), "--no-progress"]


def test_generate_killed_at_random_moments(llm_endpoint, tmp_path):
    import json

    from tomtransfer.services.collector.generate import generate_dir
    from tomtransfer.shared.config import load_config

    rng = seeded("generate")
    ref_cfg = generate_config(tmp_path / "ref.yaml", tmp_path / "ref", llm_endpoint.url)
    cfg = generate_config(tmp_path / "crash.yaml", tmp_path / "crash", llm_endpoint.url)
    ref_root, root = (generate_dir(load_config(c)) / "samples" for c in (ref_cfg, cfg))
    blocks = len(GEN_SCENARIOS) * GEN_N // GEN_BLOCK
    span = random_span(generate_cmd(ref_cfg), lambda: [ref_root], tmp_path / "reference.log",
                       rounds=blocks // GEN_CONCURRENCY)
    reference = reference_rows(ref_root / "samples.parquet", SAMPLE_KEY)
    print(f"[crash] generate payload: {incompressible(ref_root, GEN_BLOCK)}", flush=True)
    killer = Killer(generate_cmd(cfg), lambda: [root], rng, tmp_path / "generate.log", span)

    kill_loop(killer, KILLS["generate"], lambda why: check_partial(root, SAMPLE_KEY, reference, GEN_BLOCK, why))

    r = subprocess.run(generate_cmd(cfg), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check_final(root, "samples.parquet", SAMPLE_KEY, reference, GEN_N, killer.summary())
    # The same training set and per-scenario metrics (C-rate, invalid rate, counts) as the uninterrupted run.
    meta, ref_meta = (json.loads((d.parent / "dataset" / "dataset_meta.json").read_text()) for d in (root, ref_root))
    assert meta["content_hash"] == ref_meta["content_hash"], killer.summary()
    assert meta["scenarios"] == ref_meta["scenarios"], killer.summary()


# ------------------------------------------------------------------------------------------ evaluate
EVAL_SCENARIOS = ["IR_prison", "biz_staghunt", "pgg"]
EVAL_N, EVAL_BLOCK, EVAL_CONCURRENCY = 192, 32, 4  # 2 sampled roles x 3 scenarios x 6 blocks = 36 blocks


def evaluate_config(path: Path, out: Path, url: str, tracking_uri: str) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "crash-eval",
        "output_dir": str(out),
        "models": {"teacher": {"model": "tiny-teacher"}, "student": {"model": "tiny-student"}},
        "sampling": {"temperature": 1.5, "max_tokens": 128, "seed": SEED % 10_000},
        "scenarios": {"ids": EVAL_SCENARIOS},
        "serving": {"base_url": url},
        "training": {"adapter_name": "tt"},  # the fixture serves a LoRA adapter as student:tt
        # two sampled roles with motivations (random text payloads) and one exact role: both kinds of store
        "evaluate": {"samples": EVAL_N, "request_n": EVAL_BLOCK, "concurrency": EVAL_CONCURRENCY,
                     "estimator": "exact", "protocol": "paper", "teacher_reference": "evaluate", "bootstrap": 200,
                     "instructions": {"student_base": "answer_motivation"}, "families": ["in_sample", "pgg"],
                     # the teacher's leading-answer rows are one more exact store like student_finetuned's; off here
                     # so the kill loop's runs stay the size they were
                     "teacher_lead": False},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "crash-tests"},
    }))
    return path


def evaluate_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "tomtransfer.services.cli", "evaluate", "--config", str(cfg)]


def logged_metrics(log: Path, tracking_uri: str) -> dict[str, float]:
    """The metrics the last finished evaluate command in `log` logged to MLflow (timings left out)."""
    from mlflow.tracking import MlflowClient

    run_id = re.findall(r"mlflow run: (\w+)", log.read_text())[-1]
    metrics = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if not any(w in k for w in ("latency", "seconds", "timing"))}


def role_stores(run_dir: Path) -> dict[str, Path]:
    """`<run_dir>/evaluate/<role>-<key>/{samples,exact}` by role (the folder names come from the role's inputs)."""
    return {p.parent.name.split("-")[0]: p for p in sorted((run_dir / "evaluate").glob("*-*/*"))
            if p.is_dir() and p.name in ("samples", "exact")}


def store_file(root: Path) -> tuple[str, tuple]:
    return ("samples.parquet", SAMPLE_KEY) if root.name == "samples" else ("exact.parquet", EXACT_KEY)


def test_evaluate_killed_at_random_moments(llm_endpoint, mlflow_tracking_uri, tmp_path):
    rng = seeded("evaluate")
    ref_cfg = evaluate_config(tmp_path / "ref.yaml", tmp_path / "ref", llm_endpoint.url, mlflow_tracking_uri)
    cfg = evaluate_config(tmp_path / "crash.yaml", tmp_path / "crash", llm_endpoint.url, mlflow_tracking_uri)
    ref_dir, run_dir = tmp_path / "ref" / "crash-eval", tmp_path / "crash" / "crash-eval"
    ref_log = tmp_path / "reference.log"
    blocks = 2 * len(EVAL_SCENARIOS) * EVAL_N // EVAL_BLOCK
    span = random_span(evaluate_cmd(ref_cfg), lambda: list(role_stores(ref_dir).values()), ref_log,
                       rounds=blocks // EVAL_CONCURRENCY)
    killer = Killer(evaluate_cmd(cfg), lambda: list(role_stores(run_dir).values()), rng, tmp_path / "evaluate.log",
                    span)
    ref_metrics = logged_metrics(ref_log, mlflow_tracking_uri)
    ref_stores = role_stores(ref_dir)
    kinds = {role: p.name for role, p in ref_stores.items()}
    assert kinds == {"teacher": "samples", "student_base": "samples", "student_finetuned": "exact"}, kinds
    reference = {role: reference_rows(p / store_file(p)[0], store_file(p)[1]) for role, p in ref_stores.items()}
    print(f"[crash] evaluate payload (teacher): {incompressible(ref_stores['teacher'], EVAL_BLOCK)}", flush=True)

    def check(why: str) -> int:
        kept = 0
        for role, root in role_stores(run_dir).items():
            assert kinds[role] == root.name, why
            block = EVAL_BLOCK if root.name == "samples" else None
            name, key = store_file(root)
            kept += check_partial(root, key, reference[role], block, f"{why} [{role}]", compact_name=name)
        return kept

    kill_loop(killer, KILLS["evaluate"], check)

    log = tmp_path / "final.log"
    with open(log, "wb") as fh:
        r = subprocess.run(evaluate_cmd(cfg), cwd=ROOT, stdout=fh, stderr=fh, timeout=300)
    assert r.returncode == 0, log.read_text()[-3000:]
    stores = role_stores(run_dir)
    assert kinds == {role: p.name for role, p in stores.items()}
    for role, root in stores.items():
        name, key = store_file(root)
        check_final(root, name, key, reference[role], EVAL_N if root.name == "samples" else 1,
                    f"{killer.summary()} [{role}]")
    assert logged_metrics(log, mlflow_tracking_uri) == ref_metrics, killer.summary()
