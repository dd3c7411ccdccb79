"""Evaluator -> a real `mlflow server`: params, metrics, figures, tables, report, raw results and config are
logged to the run, and `report --run-id` regenerates the same numbers from the run alone.

Starts a server: run inside a private network namespace (`scripts/in-netns`, as `make test` does).
"""

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.fixtures import synthetic_results as synthetic
from tomtransfer.services.evaluator.rerun import ReportError, report
from tomtransfer.services.evaluator.tracking import (
    EXPERIMENT_KIND_TAG, HEADLINE_VIEW, TRAINING_KIND, VIEW_TAG_PREFIX, evaluate_and_log, flatten_params, view_metrics,
)
from tomtransfer.shared.config import load_config

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = pytest.mark.netns

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
N_BOOT = 300


@pytest.fixture
def tracking(mlflow_tracking_uri):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_tracking_uri)
    mlflow.set_experiment("evaluator-tests")
    try:
        yield mlflow_tracking_uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(before)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_sampled_evaluation_is_logged_and_the_report_regenerates(tracking, tmp_path):
    cfg = load_config(CONFIG)
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"estimator": "sample", "samples": 300, "bootstrap": N_BOOT})})
    samples = tmp_path / "evaluate" / "samples"
    samples.mkdir(parents=True)
    synthetic.paper_samples().to_parquet(samples / "samples.parquet", index=False)
    with mlflow.start_run(run_name="eval-sampled") as run:
        mlflow.log_param("models.teacher.model", cfg.models.teacher.model)  # same value: fine
        mlflow.log_param("evaluate.samples", "999")  # other value: kept, reported, no error
        result, out = evaluate_and_log(out_dir=tmp_path / "out", config=cfg, config_path=CONFIG, samples=samples)
    client = MlflowClient(tracking)
    data = client.get_run(run.info.run_id).data
    flat = result.flat_metrics()
    assert set(data.metrics) == set(flat)  # every metric arrived (several batches)
    assert round(data.metrics["improvement_mean.in_sample"], 2) == 46.26
    assert data.metrics["improvement.in_sample.IR_prison"] == pytest.approx(flat["improvement.in_sample.IR_prison"])
    assert data.metrics["rate.teacher.in_sample.IR_prison"] == pytest.approx(77 / 300)
    assert "pgg.mean.teacher" in data.metrics and "js.ft_teacher.in_sample.IR_prison" in data.metrics
    params = flatten_params(cfg)
    assert data.params["models.student.model"] == "smollm2-135m-instruct" and data.params["evaluate.samples"] == "999"
    assert data.params["evaluate.families"] == params["evaluate.families"]
    assert data.tags["tomtransfer.estimator"] == "sample"
    # the experiment (made by a plain `mlflow.set_experiment`) is marked as model training, the headline view saved
    exp = client.get_experiment(run.info.experiment_id).tags
    assert exp[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert view_metrics(exp[VIEW_TAG_PREFIX + HEADLINE_VIEW])[:2] == ["improvement_mean.in_sample",
                                                                      "improvement_mean.oos_context"]
    arts = _artifacts(client, run.info.run_id)
    for name in ("figures/fig2_cooperation_in_sample.png", "figures/fig3_improvement_oos_context.png",
                 "figures/fig5_pgg.png", "tables/table1.csv", "tables/table1.md", "tables/table1.tex",
                 "tables/evaluation.json", "report/report.md", "report/report.html", "report/report_standalone.html",
                 "samples/samples.parquet", "config/config.yaml", "config/demo.yaml"):
        assert name in arts, name

    regen = report(run.info.run_id, tracking_uri=tracking, out_dir=tmp_path / "regen")
    md = regen.report["md"].read_text()
    assert "46.26" in md and run.info.run_id in md and "eval-sampled" in md
    assert regen.result.estimator == "sample" and regen.result.flat_metrics() == pytest.approx(flat)
    assert (tmp_path / "regen" / "figures" / "fig5_pgg.png").is_file()


def test_exact_evaluation_round_trip(tracking, tmp_path):
    cfg = load_config(CONFIG)  # the demo config evaluates in exact mode, effective n = 300
    groups = [g for g in synthetic.paper_groups() if g["family"] in ("in_sample", "pgg")]
    exact = tmp_path / "exact.parquet"
    synthetic.exact_from_groups(groups).to_parquet(exact, index=False)
    with mlflow.start_run(run_name="eval-exact") as run:
        result, _ = evaluate_and_log(out_dir=tmp_path / "out", config=cfg, exact=exact, n_resamples=N_BOOT)
    client = MlflowClient(tracking)
    assert "samples/exact.parquet" in _artifacts(client, run.info.run_id, "samples")
    m = client.get_run(run.info.run_id).data.metrics
    assert round(m["improvement_mean.in_sample"], 2) == 46.26 and "improvement_ci_low.in_sample.IR_prison" not in m

    regen = report(run.info.run_id, tracking_uri=tracking, out_dir=tmp_path / "regen", log=True)
    assert regen.result.estimator == "exact" and regen.result.samples == 300
    assert "effective n = 300" in regen.report["md"].read_text()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_report_of_an_unknown_or_empty_run_is_a_user_error(tracking):
    with pytest.raises(ReportError, match="not found"):
        report("0" * 32, tracking_uri=tracking)
    with mlflow.start_run() as run:
        pass
    with pytest.raises(ReportError, match="no samples/"):
        report(run.info.run_id, tracking_uri=tracking)
