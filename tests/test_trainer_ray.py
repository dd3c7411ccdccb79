"""LoRA training on Ray Train with 2 CPU workers on a tiny random model, tracked by a real MLflow server.

- loss decreases; adapter weights identical across ranks (per-rank checksums gathered and reported);
- the adapter is in MLflow (`runs:/<id>/adapter` and a LoggedModel), and reloading it with
  `PeftModel.from_pretrained` reproduces the logits rank 0 computed at the end of training;
- a worker SIGKILLed one (fast) step after a checkpoint (a lost node: no exception, no cleanup) is restarted by
  FailureConfig from that checkpoint - Ray Train records a checkpoint only at its controller's next poll (every
  2 s) and the loop waits for that - and training completes, bit-for-bit the same adapter as the uninterrupted run;
- an interrupted run (an exception, max_failures=0) resumes from its latest checkpoint when run again;
- intermediate metrics go to Ray at most every `report_every_s` (a report is a barrier: one per step capped the
  2-GPU loop at one step per 2 s); the count follows the setting and the adapter does not depend on it.
- the sft+distribution objective through the train stage (soft labels as the run's MLflow dataset input, both
  losses logged, the adapter in MLflow).
The uninterrupted run is the baseline of the others (one Ray cluster for the module, one training run per behaviour).
Runs only in a private network namespace (scripts/in-netns), like everything that starts Ray.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
import time

import pytest

from tests.fixtures.netns_guard import require_private_netns

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = [pytest.mark.netns, pytest.mark.slow]

SCENARIOS = ["IR_prison", "biz_staghunt", "team_snowdrift", "environment_delight"]


@pytest.fixture(scope="module")
def ray_cluster():
    require_private_netns()
    import ray

    tmp = tempfile.mkdtemp(prefix="/tmp/rt")  # short: Ray's socket paths must stay under 107 characters
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("student") / "tiny-llama", arch="llama", seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tomtransfer.services.trainer.dataset import export_training_set
    from tests.fixtures.synthetic_samples import fake_samples

    samples = fake_samples(SCENARIOS, n=8, c_rate=0.9, invalid_rate=0.0, seed=5)
    return export_training_set(samples, tmp_path_factory.mktemp("dataset"), targets="answer")


def _cfg(tmp_path, student, name, **training):
    from tomtransfer.shared.config import parse_config

    t = {"num_workers": 2, "cpus_per_worker": 1, "epochs": 3, "effective_batch_size": 16,
         "per_device_batch_size": 4, "learning_rate": 3e-2, "max_seq_len": 1024, "max_failures": 1}
    t.update(training)
    return parse_config({
        "name": name, "output_dir": str(tmp_path),
        "models": {"teacher": {"model": "fake-teacher"}, "student": {"model": str(student)}},
        "training": t,
    })


def _run_id(cfg, dataset, tracking_uri) -> str:
    """The train stage's MLflow run for these inputs (created, or the one an earlier attempt recorded), which
    `run_training` logs into."""
    from tomtransfer.services.pipeline.stages import Context, train_dir, train_run

    return train_run(cfg, Context(tracking_uri=tracking_uri), train_dir(cfg, dataset.parquet))[0]


@pytest.fixture(scope="module")
def trained(ray_cluster, student, dataset, tmp_path_factory, mlflow_tracking_uri):
    """One uninterrupted 2-worker run (32 examples, 3 epochs, 6 optimizer steps), its MLflow run ended as the train
    stage ends it."""
    from tomtransfer.services.pipeline.stages import Context, close_stage_run
    from tomtransfer.services.trainer.train import run_training

    out = tmp_path_factory.mktemp("runs")
    cfg = _cfg(out, student, "plain")
    t0 = time.perf_counter()
    # metrics to Ray never (1 h apart) - checkpoints and the end report anyway: the gated side of the reports test
    result = run_training(cfg, dataset.parquet, student, mlflow_tracking_uri,
                          run_id=_run_id(cfg, dataset, mlflow_tracking_uri),
                          extra_loop_config={"report_every_s": 3600})
    result["test_wall_s"] = time.perf_counter() - t0
    close_stage_run(Context(tracking_uri=mlflow_tracking_uri), result["run_id"])
    return cfg, result


def test_loss_decreases_and_ranks_agree(trained, mlflow_tracking_uri):
    from mlflow.tracking import MlflowClient

    cfg, r = trained
    assert r["total_steps"] == 6 and r["step"] == 6 and r["start_step"] == 0
    assert r["loss_last"] < 0.8 * r["loss_first"], r
    assert len(r["adapter_checksums"]) == 2 and r["adapters_identical"], r["adapter_checksums"]
    client = MlflowClient(mlflow_tracking_uri)
    losses = [m.value for m in sorted(client.get_metric_history(r["run_id"], "loss"), key=lambda m: m.step)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(client.get_run(r["run_id"]).data.metrics)
    params = client.get_run(r["run_id"]).data.params
    assert params["training.lora.r"] == "8" and params["training.lora.alpha"] == "16"
    assert params["world_size"] == "2" and params["grad_accum"] == "2" and params["effective_batch"] == "16"


def test_adapter_in_mlflow_reproduces_trained_logits(trained, student, mlflow_tracking_uri, tmp_path):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, r = trained
    assert r["adapter_uri"] == f"runs:/{r['run_id']}/adapter"
    local = mlflow.artifacts.download_artifacts(r["adapter_uri"], dst_path=str(tmp_path / "a"),
                                                tracking_uri=mlflow_tracking_uri)
    probe_dir = mlflow.artifacts.download_artifacts(f"runs:/{r['run_id']}/probe", dst_path=str(tmp_path / "p"),
                                                    tracking_uri=mlflow_tracking_uri)
    probe = torch.load(f"{probe_dir}/probe.pt")
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    model = PeftModel.from_pretrained(base, local).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], probe["logits"][mask], rtol=1e-4, atol=1e-4)
    assert (before[mask] - probe["logits"][mask]).abs().max() > 1e-2  # the adapter changed something

    client = MlflowClient(mlflow_tracking_uri)
    run = client.get_run(r["run_id"])
    assert run.info.status == "FINISHED"
    model_id = run.data.tags["tomtransfer.adapter_model_id"]
    logged = client.get_logged_model(model_id)
    assert logged.name == cfg.training.adapter_name and logged.source_run_id == r["run_id"]
    names = {f.path for f in client.list_logged_model_artifacts(model_id)}
    assert {"adapter_config.json", "adapter_model.safetensors", "tomtransfer_training.json"} <= names
    # the local copy next to the run folder is the same adapter
    assert (Path(r["adapter_dir"]) / "adapter_model.safetensors").is_file()


def test_a_worker_killed_right_after_a_checkpoint_restarts_from_it(ray_cluster, student, dataset, tmp_path, trained):
    from tomtransfer.services.trainer.train import run_training

    marker = tmp_path / "fault-fired"
    cfg = _cfg(tmp_path, student, "killed", max_failures=1)
    r = run_training(cfg, dataset.parquet, student, None, checkpoint_every_steps=2,
                     extra_loop_config={"fault": {"at_step": 3, "rank": 1, "marker": str(marker), "kill": True}})
    assert marker.read_text().startswith("fault injected at step 3 on rank 1")  # the fault fired ...
    assert r["start_step"] == 2 and r["step"] == 6  # ... and the restarted group resumed at the step-2 checkpoint
    assert r["adapters_identical"]
    # exact resume: same weights as the run that was never interrupted
    assert r["adapter_checksums"] == trained[1]["adapter_checksums"]


def test_ray_metric_reports_are_rate_limited_and_do_not_change_training(ray_cluster, student, dataset, tmp_path,
                                                                        trained):
    from tomtransfer.services.trainer.train import run_training

    every = run_training(_cfg(tmp_path, student, "every"), dataset.parquet, student, None,
                         extra_loop_config={"report_every_s": 0})
    gated = trained[1]
    assert every["step"] == gated["step"] == 6  # 32 examples / effective batch 16: 2 steps an epoch, 3 epochs
    assert every["ray_metric_reports"] == 6 - 3  # all but the 2 epoch-end checkpoints and the final report
    assert gated["ray_metric_reports"] == 0
    assert every["adapters_identical"] and every["adapter_checksums"] == gated["adapter_checksums"]


def test_interrupted_run_resumes(ray_cluster, student, dataset, tmp_path, mlflow_tracking_uri, trained):
    from tomtransfer.services.trainer.train import run_training

    cfg = _cfg(tmp_path, student, "interrupted", max_failures=0)
    with pytest.raises(Exception, match="injected fault"):
        run_training(cfg, dataset.parquet, student, mlflow_tracking_uri, _run_id(cfg, dataset, mlflow_tracking_uri),
                     checkpoint_every_steps=2,
                     extra_loop_config={"fault": {"at_step": 3, "rank": 0, "marker": str(tmp_path / "m")}})
    from tomtransfer.services.trainer.train import train_dir

    first_run_id = (train_dir(cfg, dataset.parquet) / "mlflow_run_id").read_text().strip()
    # Other inputs (a learning rate) never resume this run: their storage is another keyed folder.
    other = cfg.model_copy(update={"training": cfg.training.model_copy(update={"learning_rate": 1e-3})})
    assert train_dir(other, dataset.parquet) != train_dir(cfg, dataset.parquet)
    assert not (train_dir(other, dataset.parquet) / "ray").exists()
    r = run_training(cfg, dataset.parquet, student, mlflow_tracking_uri, _run_id(cfg, dataset, mlflow_tracking_uri),
                     checkpoint_every_steps=2)
    assert r["resumed_run"] and r["start_step"] == 2 and r["step"] == 6
    assert r["run_id"] == first_run_id  # the same MLflow run continues (the train stage's record)
    assert r["adapter_checksums"][0] == trained[1]["adapter_checksums"][0]


DIST_IDS = ["IR_prison", "biz_staghunt", "environment_snowdrift", "team_delight"]


def test_sft_plus_distribution_on_ray_train(ray_cluster, tmp_path, mlflow_tracking_uri):
    """sft+distribution through the train stage: the same recipe as sft, the ranks agree, the soft-label set is the
    run's MLflow dataset input (digest = its content hash's first 32 hex digits), both losses are logged, the
    adapter is in MLflow."""
    from mlflow.tracking import MlflowClient

    from tomtransfer.services.pipeline.stages import Context, train
    from tomtransfer.services.trainer.dataset import export_training_set
    from tomtransfer.services.trainer.softlabels import SoftLabelExport, build_soft_labels, export_soft_labels
    from tomtransfer.shared.config import parse_config
    from tomtransfer.shared.scenarios import default_catalog
    from tests.fixtures.synthetic_samples import fake_samples
    from tests.fixtures.tiny_models import tiny_model_dir

    student = tiny_model_dir("llama", seed=1)
    data = export_training_set(fake_samples(DIST_IDS, n=2, c_rate=0.5, invalid_rate=0.0, seed=3), tmp_path / "ds",
                               targets="answer").parquet
    cat = default_catalog()
    df, _ = build_soft_labels([cat.scenarios[i] for i in DIST_IDS], None,
                              {i: {"p_C": p, "p_D": 1 - p} for i, p in zip(DIST_IDS, (0.1, 0.4, 0.6, 0.9))},
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
    out = train(cfg, Context(tracking_uri=mlflow_tracking_uri), data)
    assert (Path(out.adapter_dir) / "adapter_model.safetensors").is_file() and out.steps == 4
    client = MlflowClient(mlflow_tracking_uri)
    run = client.get_run(out.run_id)
    assert run.data.params["training.objective"] == "sft+distribution"
    assert {"loss", "loss_sft", "loss_distribution"} <= set(run.data.metrics)
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests.get("soft") == SoftLabelExport.from_dir(soft.out_dir).mlflow_digest
    assert run.data.tags.get("tomtransfer.adapter_uri") == f"runs:/{out.run_id}/adapter"
