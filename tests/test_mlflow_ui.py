"""The MLflow UI as a person sees it, in headless Chromium against a real `mlflow server`: the experiment opens on
the runs table (model training, not MLflow 3.17's GenAI overview) with the headline metrics as columns, and a
sweep's child runs carry the same metric names, so the compare view lines the cells up.

Starts a server: run inside a private network namespace (`scripts/in-netns`, as `make test` does).
The screenshots stay under each test's tmp dir; benchmarks/results/mlflow_ui_runs_table.png and mlflow_ui_sweep.png
are crops (the left 2800 x 420 px) of two of them.
"""

import json
import re
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.fixtures import synthetic_results as synthetic
from tomtransfer.services.evaluator.tracking import (
    CELL_TAG, EXPERIMENT_KIND_TAG, HEADLINE_VIEW, SUMMARY_CSV, SUMMARY_JSON, TRAINING_KIND, VIEW_TAG_PREFIX,
    evaluate_and_log, experiment_url, headline_metrics, metric_column, param_column, start_sweep, summarize_sweep,
    use_experiment, view_metrics,
)
from tomtransfer.shared.config import load_config

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = pytest.mark.netns

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
N_BOOT = 50
WIDE = (5600, 1000)  # the runs table renders only the columns that fit the window


@pytest.fixture
def tracking(mlflow_tracking_uri):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_tracking_uri)
    try:
        yield mlflow_tracking_uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(before)


def _exact(finetuned_share: float = 1.0):
    """The paper's counts in exact mode; the fine-tuned student's cooperation scaled, so cells differ."""
    groups = synthetic.paper_groups()
    for g in groups:
        if g["role"] == "student_finetuned" and "c" in g:
            g["c"] = round(g["c"] * finetuned_share)
    return synthetic.exact_from_groups(groups)


def _evaluate(cfg, tmp: Path, name: str, share: float, tags: dict | None = None) -> str:
    """One run logged the way the pipeline's evaluate stage logs it."""
    with mlflow.start_run(run_name=name, tags=tags) as run:
        evaluate_and_log(out_dir=tmp / name, config=cfg, exact=_exact(share), n_resamples=N_BOOT)
    return run.info.run_id


def _header_ids(dom: str) -> set[str]:
    """The runs table's column ids (ag-grid header cells)."""
    tags = re.findall(r"<[^>]*role=\"columnheader\"[^>]*>", dom)
    return {m.group(1) for t in tags if (m := re.search(r'col-id="([^"]+)"', t))}


def _cells(dom: str, column: str) -> list[str]:
    """The texts of a runs-table column's body cells (each up to the next cell)."""
    out = []
    for m in re.finditer(r'<[^>]*role="gridcell"[^>]*col-id="' + re.escape(column) + r'"[^>]*>', dom):
        nxt = dom.find('role="gridcell"', m.end())
        end = dom.rfind("<", m.end(), nxt) if nxt > 0 else len(dom)
        out.append(" ".join(re.sub(r"<[^>]+>", " ", dom[m.end():end]).split()))
    return out


def _numbers(texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        try:
            out.append(float(t))
        except ValueError:
            pass  # "-" or "- (average)": no value in that row
    return out


def _cell(dom: str, column: str) -> str:
    cells = _cells(dom, column)
    assert cells, f"no cell in column {column}"
    return cells[0]


def test_the_experiment_opens_on_the_runs_table_with_the_headline_metrics(tracking, tmp_path, browser):
    exp_id = use_experiment("ui-demo")
    assert MlflowClient(tracking).get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    run_id = _evaluate(load_config(CONFIG), tmp_path, "demo-run", 1.0)

    client = MlflowClient(tracking)
    metrics = client.get_run(run_id).data.metrics
    headline = headline_metrics(metrics)
    assert headline[:4] == ["improvement_mean.in_sample", "improvement_mean.oos_context", "improvement_mean.oos_game",
                            "improvement_mean.all"]
    assert "pgg.improvement" in headline and "valid_share_mean.student_finetuned.in_sample" in headline
    tags = client.get_experiment(exp_id).tags
    assert view_metrics(tags[VIEW_TAG_PREFIX + HEADLINE_VIEW]) == headline

    url = experiment_url(tracking, exp_id)
    assert url.endswith(f"/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={HEADLINE_VIEW}")
    shot = tmp_path / "runs_table.png"
    dom = browser(url, screenshot=shot, size=WIDE)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the runs table, not the GenAI overview (its "Traces 0" / "No data available" panels, its "Evaluation runs")
    assert "No data available" not in dom and "Evaluation runs" not in dom
    assert "demo-run" in dom and "Run Name" in dom
    headers = _header_ids(dom)
    assert {metric_column(m) for m in headline} <= headers, sorted(headers)
    for m in ("improvement_mean.in_sample", "valid_share_mean.student_finetuned.in_sample"):
        assert float(_cell(dom, metric_column(m))) == pytest.approx(metrics[m])  # the value, in its column


def test_a_sweep_logs_comparable_children_and_a_summary_on_the_parent(tracking, tmp_path, browser):
    cfg = load_config(CONFIG)
    sweep = start_sweep(tracking, "ui-sweep", "lr-grid", params={"grid.training.learning_rate": [1e-4, 3e-4]})
    cells = {"lr=1e-4": (1e-4, 1.0), "lr=3e-4": (3e-4, 0.8)}
    mlflow.set_experiment(experiment_id=sweep.experiment_id)
    for cell, (lr, share) in cells.items():
        cell_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"learning_rate": lr})})
        _evaluate(cell_cfg, tmp_path, cell, share, tags=sweep.child_tags(cell))

    client = MlflowClient(tracking)
    children = sweep.children()
    assert set(children) == set(cells)
    names = [set(r.data.metrics) for r in children.values()]
    assert names[0] == names[1] and len(names[0]) > 1000  # the same metric names in every child
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.run_id for r in children.values())

    rows = summarize_sweep(sweep, list(cells))
    assert [r["cell"] for r in rows] == list(cells) and {r["status"] for r in rows} == {"FINISHED"}
    assert [r["training.learning_rate"] for r in rows] == ["0.0001", "0.0003"]  # the param that differs
    assert "models.student.model" not in rows[0]  # ... and only those
    a, b = (children[c].data.metrics["improvement_mean.in_sample"] for c in cells)
    assert [r["improvement_mean.in_sample"] for r in rows] == [a, b] and a != b
    parent = client.get_run(sweep.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["grid.training.learning_rate"] == "[0.0001, 0.0003]"
    assert parent.data.metrics["sweep.cells_finished"] == 2
    assert parent.data.metrics["sweep.max.improvement_mean.in_sample"] == max(a, b)
    assert parent.data.metrics["sweep.mean.improvement_mean.in_sample"] == pytest.approx((a + b) / 2)
    assert json.loads(Path(mlflow.artifacts.download_artifacts(run_id=sweep.run_id, artifact_path=SUMMARY_JSON,
                                                               dst_path=str(tmp_path / "dl"))).read_text()) == rows
    assert {a.path for a in client.list_artifacts(sweep.run_id)} >= {SUMMARY_JSON, SUMMARY_CSV}

    # a rerun resumes the same parent and sees the finished cells
    again = start_sweep(tracking, "ui-sweep", "lr-grid", resume_run_id=sweep.run_id)
    assert again == sweep and again.finished("lr=1e-4").info.run_id == children["lr=1e-4"].info.run_id

    # the sweep's view: its cells side by side in the runs table, the differing param and the headline metrics as
    # columns - one column per metric name, a value per cell
    url = sweep.url()
    assert url.endswith(f"viewStateShareKey=sweep-{sweep.run_id}")
    shot = tmp_path / "sweep.png"
    dom = browser(url, screenshot=shot, size=WIDE)
    assert shot.stat().st_size > 10_000 and "Evaluation runs" not in dom
    assert {param_column("training.learning_rate"), metric_column("improvement_mean.in_sample"),
            metric_column("valid_share_mean.student_finetuned.oos_game")} <= _header_ids(dom)
    shown = _numbers(_cells(dom, metric_column("improvement_mean.in_sample")))
    assert sorted(shown) == pytest.approx(sorted([a, b]))  # each cell's value in the one column
    assert {"0.0001", "0.0003"} <= set(_cells(dom, param_column("training.learning_rate")))

    # MLflow's compare page takes the two cells: one row per metric name, a column per cell
    ids = [children[c].info.run_id for c in cells]
    dom = browser(f"{tracking}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([sweep.experiment_id])}")
    assert "Comparing 2 Runs" in dom and all(c in dom for c in cells)


def test_a_sweep_with_a_missing_or_failed_cell_is_closed_failed(tracking):
    sweep = start_sweep(tracking, "ui-sweep-partial", "partial")
    with mlflow.start_run(experiment_id=sweep.experiment_id, tags=sweep.child_tags("a")):
        mlflow.log_metric("improvement_mean.in_sample", 5.0)
    rows = summarize_sweep(sweep, ["a", "b"])
    assert [(r["cell"], r["status"], r["improvement_mean.in_sample"]) for r in rows] == [
        ("a", "FINISHED", 5.0), ("b", "MISSING", None)]
    parent = MlflowClient(tracking).get_run(sweep.run_id)
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep.cells_finished"] == 1
    assert sweep.finished("b") is None and sweep.children()["a"].data.tags[CELL_TAG] == "a"
    # a parent that no longer exists is not resumed: a new one starts
    fresh = start_sweep(tracking, "ui-sweep-partial", "partial", resume_run_id="0" * 32)
    assert fresh.run_id != sweep.run_id
