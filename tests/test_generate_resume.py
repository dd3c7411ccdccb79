"""`generate` against a really served model: exact counts, the training-set exports, MLflow logging, bad input.
kill -9 at random moments and the rerun after it: tests/test_crash_kill9.py.

Starts servers: run inside a private network namespace (`scripts/in-netns`, as `make test` does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tomtransfer.services.collector.generate import generate

pytest_plugins = ["tests.fixtures.llm_endpoint", "tests.fixtures.mlflow_server"]
pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["IR_prison", "biz_staghunt", "team_snowdrift", "environment_delight", "sports_prison", "pgg"]
N, BLOCK = 12, 4


def write_config(path: Path, out: Path, url: str, tracking_uri: str | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "gen-test",
        "output_dir": str(out),
        "models": {"teacher": {"model": "tiny-teacher"}, "student": {"model": "tiny-student"}},
        "sampling": {"temperature": 0.8, "max_tokens": 8, "seed": 5},
        "scenarios": {"ids": SCENARIOS},
        "serving": {"base_url": url},
        # valid_policy all: a random-weight teacher rarely answers in format; the test is about bookkeeping.
        "generate": {"samples": N, "request_n": BLOCK, "concurrency": 2, "valid_policy": "all",
                     "families": ["in_sample", "oos_context", "pgg"]},  # every family of SCENARIOS
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "generate-tests"},
    }))
    return path


def cli(config: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tomtransfer.services.cli", "generate", "--config", str(config),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def uninterrupted_config(llm_endpoint, mlflow_tracking_uri, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return write_config(tmp / "cfg.yaml", tmp / "runs", llm_endpoint.url, mlflow_tracking_uri)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_config):
    return generate(uninterrupted_config, progress=False)


@pytest.fixture(scope="module")
def generate_stage(uninterrupted, uninterrupted_config, llm_endpoint, mlflow_tracking_uri):
    """The pipeline's generate stage on the same config: the samples are all in the store (nothing requested
    again); the stage creates its MLflow run and the collector logs into it."""
    from tomtransfer.services.collector.jobs import as_config
    from tomtransfer.services.pipeline.stages import Context, generate as stage

    ctx = Context(tracking_uri=mlflow_tracking_uri, url=llm_endpoint.url, progress=False)
    return stage(as_config(uninterrupted_config), ctx)


def test_counts_exact_and_exports(uninterrupted):
    res = uninterrupted
    t = pq.read_table(res.samples_path)
    keys = list(zip(t.column("scenario_id").to_pylist(), t.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)) == len(SCENARIOS) * N
    for sid in SCENARIOS:
        assert sorted(i for s, i in keys if s == sid) == list(range(N))
    assert set(t.column("role").to_pylist()) == {"teacher"} and set(t.column("model").to_pylist()) == {"teacher"}
    first = json.loads(t.column("messages")[0].as_py())
    assert [m["role"] for m in first] == ["system", "user"] and "reasoning" in first[0]["content"]
    # valid + invalid = N for every scenario; the card says so too.
    ex = res.dataset
    assert ex.samples == len(SCENARIOS) * N and {s["samples"] for s in ex.scenarios} == {N}
    for name in ("train.parquet", "train_alpaca.json", "train_sharegpt.json", "dataset_info.json", "DATASET_CARD.md"):
        assert (res.dataset_dir / name).is_file(), name
    assert res.report.requests == len(SCENARIOS) * 3


def test_mlflow_run_logged(uninterrupted, generate_stage, mlflow_tracking_uri):
    from mlflow.tracking import MlflowClient

    assert generate_stage.written == 0 and generate_stage.already == len(SCENARIOS) * N
    client = MlflowClient(mlflow_tracking_uri)
    run = client.get_run(generate_stage.mlflow_run_id)
    assert run.info.run_name == "gen-test-generate" and run.info.status == "FINISHED"
    assert run.data.tags["tomtransfer.stage"] == "generate" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.params["samples_per_scenario"] == str(N)
    assert run.data.params["teacher_model"] == "tiny-teacher"
    assert run.data.metrics["samples"] == len(SCENARIOS) * N
    assert "invalid_rate.IR_prison" in run.data.metrics
    # the teacher's cost: every sample's prompt + completion tokens (the endpoint reports them per choice)
    t = pq.read_table(uninterrupted.samples_path).to_pylist()
    assert all(r["completion_tokens"] is not None for r in t)
    m = run.data.metrics
    assert m["teacher_cost.tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in t) > 0
    assert m["teacher_cost.forward_passes"] == sum(1 + r["completion_tokens"] for r in t)
    assert m["teacher_cost.samples"] == len(SCENARIOS) * N and m["teacher_cost.samples_uncounted"] == 0
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == uninterrupted.dataset.mlflow_digest
    arts = {f.path for f in client.list_artifacts(run.info.run_id, "dataset")}
    assert "dataset/DATASET_CARD.md" in arts
    assert [f.path for f in client.list_artifacts(run.info.run_id, "samples")] == ["samples/samples.parquet"]


def test_cli_bad_input_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nmodels: {teacher: {model: a}}\n")
    r = cli(cfg)
    _, err = r.communicate(timeout=60)
    assert r.returncode == 2 and err.decode().count("\n") == 1 and "models.student" in err.decode()
