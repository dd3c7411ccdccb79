"""One set of accelerators for serving and training (2 GPUs on the H200 machine): `tomtransfer run` lets its serving
app step aside while the training workers need the replicas' resources, then deploys it again for the evaluation;
replicas that can never fit the local cluster fail in one line instead of Serve waiting out its timeout.

The step-aside itself is checked on the session's shared tiny run, sized from this machine's cores so that the
replicas and the workers cannot fit at once: tests/test_e2e_pipeline.py
(`test_serving_steps_aside_for_training_that_cannot_fit_beside_it`; the run is read by that one module, so it runs
once under pytest-xdist's loadfile). Starts Ray and servers: runs inside a private network namespace (`make test`
does).
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


def test_replicas_that_cannot_fit_fail_in_one_line(tmp_path, mlflow_tracking_uri):
    path = experiment(tmp_path, mlflow_tracking_uri, replica_cpus=CPUS, worker_cpus=0.25)
    res = tomtransfer("run", "--config", path, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "the serving replicas need" in last and "num_cpus" in last, last
