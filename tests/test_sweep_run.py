"""`tomtransfer sweep`: a grid on tiny models -> one parent MLflow run with a child run per cell (each a whole
pipeline: Ray Serve, Ray Train, evaluation), the cells running at once as Ray tasks against one shared serving app;
a rerun skips the finished cells; a summary table compares them.

Starts Ray and servers: runs inside a private network namespace (`make test` does).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = [pytest.mark.netns, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def tomtransfer(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_sweep_runs_cells_as_child_runs_and_skips_finished_ones(tmp_path, mlflow_tracking_uri):
    from mlflow.tracking import MlflowClient

    from tests.fixtures.tiny_models import tiny_model_dir

    base = {
        "name": "sweep-base",
        "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": {"model": str(tiny_model_dir("llama", seed=7)), "num_cpus": 0.5},
                   "student": {"model": str(tiny_model_dir("llama", seed=8)), "num_cpus": 0.5}},
        "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 1},
        "scenarios": {"ids": ["IR_prison", "team_delight", "IR_prison_x2", "sports_prison", "pgg"]},
        "serving": {"port": 8125},
        # valid_policy all: random-weight teachers rarely answer in format; the test is about the sweep
        "generate": {"samples": 4, "request_n": 4, "valid_policy": "all"},
        "training": {"epochs": 1, "learning_rate": 1e-3, "effective_batch_size": 4, "per_device_batch_size": 2,
                     "num_workers": 1, "cpus_per_worker": 0.5, "max_seq_len": 1024, "adapter_name": "cell"},
        "evaluate": {"estimator": "exact", "samples": 100},
        "mlflow": {"tracking_uri": mlflow_tracking_uri, "experiment": "sweep-test"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "tiny-sweep", "base": "base.yaml", "grid": {"sampling.seed": [1, 2]}}))

    first = tomtransfer("sweep", "--config", tmp_path / "sweep.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: 2 cells" in first.stdout

    client = MlflowClient(mlflow_tracking_uri)
    exp = client.get_experiment_by_name("sweep-test")
    parent_id = (tmp_path / "runs" / "tiny-sweep" / "sweep_run_id").read_text().strip()
    cells = client.search_runs([exp.experiment_id], f"tags.`tomtransfer.sweep_parent` = '{parent_id}'")
    assert len(cells) == 2 and all(c.info.status == "FINISHED" for c in cells)
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in cells)
    # what each cell asked of the teacher (issue 22: sweeps compare at equal teacher cost): 2 in-sample scenarios x 4
    # samples (generate.families: in_sample), no soft labels under sft
    for c in cells:
        m = {k: v for k, v in c.data.metrics.items() if k.startswith("teacher_cost.")}
        assert m["teacher_cost.generate.samples"] == 8 and m["teacher_cost.tokens"] == \
            m["teacher_cost.generate.tokens"] > m["teacher_cost.generate.completion_tokens"] > 0, m
    # concurrent: both cells ran as Ray tasks at once (their runs overlap in time), against one shared serving app
    # where each cell's adapter has its own name
    (a, b) = sorted(cells, key=lambda c: c.info.start_time)
    assert b.info.start_time < a.info.end_time, "the cells ran one after another"
    assert "2 cell(s) to run in 1 serving group(s)" in first.stderr
    adapters = {c.data.tags["tomtransfer.adapter_name"] for c in cells}
    assert len(adapters) == 2 and all(n.startswith("cell-") for n in adapters), adapters
    assert {c.data.params["estimator"] for c in cells} == {"exact"}
    # the two cells really differ (their configs, hence their samples)
    seeds = {c.data.params.get("sampling.seed") for c in cells}
    assert seeds == {"1", "2"}, seeds
    assert all("rate.teacher.in_sample.IR_prison" in c.data.metrics for c in cells)
    parent_files = {a.path for a in client.list_artifacts(parent_id)}
    assert "sweep_summary.json" in parent_files

    again = tomtransfer("sweep", "--config", tmp_path / "sweep.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier, skipped") == 2
    assert len(client.search_runs([exp.experiment_id], f"tags.`tomtransfer.sweep_parent` = '{parent_id}'")) == 2
