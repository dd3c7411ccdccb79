"""One set of accelerators for serving and training (2 GPUs on the H200 machine): `tomtransfer run` lets its serving
app step aside while the training workers need the replicas' resources, then deploys it again for the evaluation;
replicas that can never fit the local cluster fail in one line instead of Serve waiting out its timeout.

The same logic on CPUs: the replicas and the workers are sized from this machine's cores so that both cannot fit at
once. The step-aside is read from the session's shared tiny run and its rerun (`tiny_pipeline`, sized that way in
tests/fixtures/pipeline.py; tests/test_e2e_pipeline.py reads the same run). Starts Ray and servers: runs inside a
private network namespace (`make test` does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = [pytest.mark.netns, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
CPUS = os.cpu_count() or 2


def experiment(tmp_path: Path, mlflow_tracking_uri: str, replica_cpus: float, worker_cpus: float) -> Path:
    from tests.fixtures.tiny_models import tiny_model_dir

    cfg = {
        "name": "handoff",
        "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": {"model": str(tiny_model_dir("llama", seed=7)), "num_cpus": replica_cpus},
                   "student": {"model": str(tiny_model_dir("llama", seed=8)), "num_cpus": replica_cpus}},
        "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 1},
        "scenarios": {"ids": ["IR_prison", "team_delight"]},
        "serving": {"port": 8127},
        "generate": {"samples": 4, "request_n": 4, "valid_policy": "all"},
        "training": {"epochs": 1, "learning_rate": 1e-3, "effective_batch_size": 4, "per_device_batch_size": 2,
                     "num_workers": 2, "cpus_per_worker": worker_cpus, "max_seq_len": 1024, "adapter_name": "h"},
        "evaluate": {"estimator": "exact", "samples": 100},
        "mlflow": {"tracking_uri": mlflow_tracking_uri, "experiment": "handoff"},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tomtransfer(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_serving_steps_aside_for_training_that_cannot_fit_beside_it(tiny_pipeline, tiny_pipeline_rerun):
    # replicas 2 x 0.4 of the cores, workers 2 x 0.25: 0.5 of the cores needed, 0.2 free while serving
    cfg = yaml.safe_load(tiny_pipeline.path.read_text())
    assert cfg["models"]["teacher"]["num_cpus"] == cfg["models"]["student"]["num_cpus"] == 0.4 * CPUS
    assert cfg["training"]["num_workers"] == 2 and cfg["training"]["cpus_per_worker"] == 0.25 * CPUS
    res = tiny_pipeline.first  # `tomtransfer run`
    assert res.returncode == 0, res.stderr[-3000:]
    err = res.stderr
    assert "steps aside while training" in err and "deploying the serving app again for the evaluation" in err
    assert err.index("steps aside") < err.index("[train] LoRA") < err.index("deploying the serving app again")
    # the evaluation ran against the redeployed app (its adapter too): the summary table (titled "transfer:
    # improvement ..." until the measurement's a5835c0) is printed
    assert "the paper's improvement" in res.stdout, res.stdout[-2000:]

    again = tiny_pipeline_rerun.result  # the same config run again: training reused, nothing to make room for
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[train] reused" in again.stderr and "steps aside" not in again.stderr


def test_replicas_that_cannot_fit_fail_in_one_line(tmp_path, mlflow_tracking_uri):
    path = experiment(tmp_path, mlflow_tracking_uri, replica_cpus=CPUS, worker_cpus=0.25)
    res = tomtransfer("run", "--config", path, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "the serving replicas need" in last and "num_cpus" in last, last
