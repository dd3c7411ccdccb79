"""sft+distribution through the train stage on Ray Train (2 CPU workers, gloo) with a real MLflow server: the same
recipe as sft, the ranks agree, the soft-label set is the run's MLflow dataset input (digest = its content hash's
first 32 hex digits), both losses are logged, the adapter is in MLflow.
Runs only in a private network namespace (scripts/in-netns), like everything that starts Ray.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.fixtures.netns_guard import require_private_netns

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = [pytest.mark.netns, pytest.mark.slow]

IDS = ["IR_prison", "biz_staghunt", "environment_snowdrift", "team_delight"]


def test_sft_plus_distribution_on_ray_train(tmp_path, mlflow_tracking_uri):
    require_private_netns()
    import ray
    from mlflow.tracking import MlflowClient

    from tomtransfer.services.pipeline.stages import Context, train
    from tomtransfer.services.trainer.dataset import export_training_set
    from tomtransfer.services.trainer.softlabels import SoftLabelExport, build_soft_labels, export_soft_labels
    from tomtransfer.shared.config import parse_config
    from tomtransfer.shared.scenarios import default_catalog
    from tests.fixtures.synthetic_samples import fake_samples
    from tests.fixtures.tiny_models import tiny_model_dir

    student = tiny_model_dir("llama", seed=1)
    data = export_training_set(fake_samples(IDS, n=2, c_rate=0.5, invalid_rate=0.0, seed=3), tmp_path / "ds",
                               targets="answer").parquet
    cat = default_catalog()
    df, _ = build_soft_labels([cat.scenarios[i] for i in IDS], None,
                              {i: {"p_C": p, "p_D": 1 - p} for i, p in zip(IDS, (0.1, 0.4, 0.6, 0.9))},
                              instruction="answer_only", teacher_instruction="answer_motivation")
    soft = export_soft_labels(df, tmp_path / "soft", name="soft", teacher="synthetic", instruction="answer_only",
                              teacher_instruction="answer_motivation")
    cfg = parse_config({
        "name": "dist", "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": {"model": "fake-teacher"}, "student": {"model": str(student)}},
        "mlflow": {"experiment": "distribution-ray"},
        "training": {"num_workers": 2, "cpus_per_worker": 1, "epochs": 2, "effective_batch_size": 4,
                     "per_device_batch_size": 2, "learning_rate": 3e-2, "objective": "sft+distribution",
                     "distribution_weight": 0.5, "soft_labels": str(soft.out_dir)},
    })
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rt"), log_to_driver=False)
    try:
        out = train(cfg, Context(tracking_uri=mlflow_tracking_uri), data)
    finally:
        ray.shutdown()
    assert (Path(out.adapter_dir) / "adapter_model.safetensors").is_file() and out.steps == 4
    client = MlflowClient(mlflow_tracking_uri)
    run = client.get_run(out.run_id)
    assert run.data.params["training.objective"] == "sft+distribution"
    assert {"loss", "loss_sft", "loss_distribution"} <= set(run.data.metrics)
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests.get("soft") == SoftLabelExport.from_dir(soft.out_dir).mlflow_digest
    assert run.data.tags.get("tomtransfer.adapter_uri") == f"runs:/{out.run_id}/adapter"
