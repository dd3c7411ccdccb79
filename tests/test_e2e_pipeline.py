"""End to end: `tomtransfer run` on tiny random-weight models through real Ray Serve, Ray Train (2 workers)
and a real `mlflow server`; the MLflow run must hold the metrics, figures and adapter, the run's page in
the MLflow UI must render in headless Chromium, a rerun must resume instead of redoing work (and, with nothing left
to measure, start no serving app), and
`tomtransfer report --run-id` must rebuild the same numbers. Bad configs exit 2 with one line.
The run has the placebo control on (`training.placebo`: a second adapter trained on the permuted set, served beside
the real one and evaluated as student_placebo) and the teacher's leading-answer rows (`evaluate.teacher_lead`, on
with the exact estimator).

The run, and its rerun, are the session's shared ones (`tiny_pipeline`, `tiny_pipeline_rerun` in
tests/fixtures/pipeline.py; only this module reads them, so under pytest-xdist's loadfile they run once); the
changed-inputs run comes after the rerun. The run's replicas and training workers are sized so that both cannot fit
at once: the serving app steps aside for training and is deployed again for the evaluation (the step-aside test). Starts Ray and servers: runs inside a private network namespace (`make test` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.fixtures.cli import tomtransfer as cli  # quick commands: forked from a helper with the imports done
from tests.fixtures.pipeline import tomtransfer  # `run` and the long ones: a plain subprocess

pytest_plugins = ["tests.fixtures.mlflow_server"]
pytestmark = pytest.mark.netns
CPUS = os.cpu_count() or 2


@pytest.fixture(scope="module")
def experiment(tiny_pipeline):
    """(config path, run folder, the first run's CompletedProcess) of the session's tiny `tomtransfer run`."""
    return tiny_pipeline


@pytest.fixture(scope="module")
def run(experiment, mlflow_tracking_uri):
    from mlflow.tracking import MlflowClient

    _, run_dir, _ = experiment
    client = MlflowClient(mlflow_tracking_uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return client, client.get_run(run_id)


def test_run_holds_metrics_figures_and_adapter(run):
    client, r = run
    assert r.info.status == "FINISHED" and r.info.run_name == "e2e-tiny"
    m = r.data.metrics
    # every family evaluated, for every scenario: 20 + 12 + 20 rates per role, and the PGG
    for role in ("teacher", "student_base", "student_finetuned"):
        for fam, n in (("in_sample", 20), ("oos_context", 12), ("oos_game", 20)):
            assert sum(k.startswith(f"rate.{role}.{fam}.") for k in m) == n, (role, fam)
        assert f"pgg.mean.{role}" in m
    assert "improvement_n.in_sample" in m and "table1.n" in m
    for k in ("timing.generate_s", "timing.train_s", "timing.evaluate_s"):
        assert m[k] > 0
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"adapter", "figures", "tables", "report", "samples", "config"} <= top
    figures = {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "figures")}
    assert {"fig2_cooperation_in_sample.png", "fig3_improvement_in_sample.png", "fig5_pgg.png"} <= figures
    adapter = {Path(a.path).name for a in client.list_artifacts(r.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter
    # child runs: the teacher dataset and the training, linked to this run
    children = client.search_runs([r.info.experiment_id], f"tags.mlflow.parentRunId = '{r.info.run_id}'")
    stages = {c.data.tags.get("tomtransfer.stage") for c in children}
    assert {"generate", "train"} <= stages
    train = next(c for c in children if c.data.tags.get("tomtransfer.stage") == "train")
    assert "train_loss" in train.data.metrics or any(k.startswith("loss") for k in train.data.metrics)


def test_placebo_adapter_and_teacher_lead_rows(experiment, run):
    """training.placebo: a second adapter on the permuted training set (its own key, MLflow run and card), served as
    student:e2e-placebo and measured like the fine-tuned student on every scenario; evaluate.teacher_lead: one exact
    row per 2x2 scenario for the teacher (part "lead") beside the students' rows, its samples where they were."""
    import pandas as pd

    path, run_dir, first = experiment
    client, r = run
    stages = json.loads((run_dir / "stages.json").read_text())
    real, placebo = stages["train"], stages["train_placebo"]
    assert placebo["key"] != real["key"] and Path(placebo["adapter_dir"]).is_dir()
    assert "[train] placebo set (seed 5)" in first.stderr
    sets = list((run_dir / "train" / "placebo-sets").iterdir())
    assert len(sets) == 1 and "seed 5" in (sets[0] / "DATASET_CARD.md").read_text()
    a = pd.read_parquet(Path(stages["generate"]["dataset"]))
    b = pd.read_parquet(sets[0] / "train.parquet")
    assert sorted(a.target) == sorted(b.target) and (a.example_id.values == b.example_id.values).all()
    assert r.data.tags["tomtransfer.placebo_adapter_name"] == "e2e-placebo"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        Path(x.path).name for x in client.list_artifacts(r.info.run_id, "adapter_placebo")}
    children = client.search_runs([r.info.experiment_id], f"tags.mlflow.parentRunId = '{r.info.run_id}'")
    prun = next(c for c in children if c.data.tags.get("tomtransfer.placebo") == "true")
    assert prun.info.run_name == "e2e-tiny-train-placebo" and prun.data.params["placebo.seed"] == "5"
    # the evaluation's exact rows, as logged: both adapters' students on all 53 scenarios, the teacher's lead rows
    exact = pd.read_parquet(mlflow_artifact(client, r.info.run_id, "samples/exact.parquet"))
    by_role = exact.groupby("role").scenario_id.nunique().to_dict()
    assert by_role == {"student_base": 53, "student_finetuned": 53, "student_placebo": 53, "teacher": 52}
    assert set(exact[exact.role == "student_placebo"].model) == {"student:e2e-placebo"}
    lead = exact[exact.role == "teacher"]
    assert (lead.part == "lead").all() and exact[exact.role != "teacher"].part.isna().all()
    assert "pgg" not in set(lead.scenario_id) and (lead.valid_mass - lead.p_C - lead.p_D).abs().max() < 1e-9
    assert "[evaluate] teacher_lead: 52 new row(s)" in first.stderr
    assert stages["evaluate"]["stores"].keys() == {"teacher", "student_base", "student_finetuned", "student_placebo",
                                                  "teacher_lead"}


def mlflow_artifact(client, run_id: str, artifact: str) -> str:
    import mlflow
    import tempfile

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tempfile.mkdtemp(),
                                               tracking_uri=client._tracking_client.tracking_uri)


def test_adapter_reloads_with_peft(run, tmp_path):
    import mlflow
    from peft import PeftConfig

    client, r = run
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="adapter", dst_path=str(tmp_path),
                                                tracking_uri=client._tracking_client.tracking_uri)
    cfg = PeftConfig.from_pretrained(local)
    assert cfg.r == 8 and set(cfg.target_modules) == {"q_proj", "v_proj"}


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


def test_generated_dataset_is_exact(experiment):
    import pyarrow.parquet as pq

    _, run_dir, _ = experiment
    from tomtransfer.services.collector.generate import generate_dir
    from tomtransfer.shared.config import load_config

    t = pq.read_table(generate_dir(load_config(experiment[0])) / "samples" / "samples.parquet").to_pandas()
    assert len(t) == 20 * 4
    assert t.groupby("scenario_id").sample_index.apply(lambda s: sorted(s) == [0, 1, 2, 3]).all()


def test_rerun_resumes_without_redoing_work(experiment, run, tiny_pipeline_rerun):
    path, run_dir, _ = experiment
    client, r = run
    before, again = tiny_pipeline_rerun.stages_before, tiny_pipeline_rerun.result  # `tomtransfer run` again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[generate] reused" in again.stderr and "[train] reused" in again.stderr
    assert "[train_placebo] reused" in again.stderr
    # nothing to measure: the serving app is never deployed (no Ray, no model loaded)
    assert "[serve]" not in again.stderr and "Ray cluster" not in again.stderr, again.stderr[-3000:]
    # every role's rows found in its keyed store, the teacher's lead rows in theirs
    for role in ("teacher", "student_base", "student_finetuned", "student_placebo", "teacher_lead"):
        assert f"[evaluate] {role}: 0 new row(s)" in again.stderr, again.stderr[-3000:]
    after = json.loads(tiny_pipeline_rerun.stages_after)
    assert json.loads(before)["train"]["adapter_uri"] == after["train"]["adapter_uri"]
    assert (run_dir / "mlflow_run_id").read_text().strip() == r.info.run_id


def test_report_rebuilds_the_logged_numbers(run, tmp_path, mlflow_tracking_uri):
    client, r = run
    res = tomtransfer("report", "--run-id", r.info.run_id, "--tracking-uri", mlflow_tracking_uri, "--out", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "report" / "report.html").is_file()
    bad = tomtransfer("report", "--run-id", "0" * 32, "--tracking-uri", mlflow_tracking_uri)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_mlflow_ui_renders_the_run(run, mlflow_tracking_uri, tmp_path, browser):
    _, r = run
    shot = tmp_path / "run.png"
    dom = browser(f"{mlflow_tracking_uri}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}", screenshot=shot)
    assert "e2e-tiny" in dom
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: {teacher: {model: a}, student: {model: b}}\ntraining: {num_workers: 0}\n", "training.num_workers"),
        ("models: {teacher: {model: a}, student: {model: b}}\nevaluate: {estimator: guess}\n", "evaluate.estimator"),
        ("name: 'bad name'\nmodels: {teacher: {model: a}, student: {model: b}}\n", "name"),
        ("models: {teacher: {model: a}, student: {model: b}}\nevaluate: {roles: [teacher, student_placebo]}\n",
         "student_placebo needs training.placebo"),
    ],
)
def test_bad_configs_exit_2(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    for cmd in ("run", "evaluate", "train", "generate", "serve"):
        res = cli(cmd, "--config", f, timeout=120)
        assert res.returncode == 2, (cmd, res.stderr)
        assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == [f]  # nothing written


def test_changed_inputs_rerun_exactly_the_stages_they_feed(experiment, run, tiny_pipeline_rerun):
    """Fingerprinted stages: a new learning rate reuses the teacher dataset, retrains, and re-measures only the
    fine-tuned student (its store is keyed by the adapter's content); never the old adapter's numbers. The serving
    app is deployed when the evaluation first needs it (after training: nothing to step aside for). The placebo
    switched off: no placebo training or role, the evaluate stage's key changes. (After the shared rerun, which must
    find the first run's stages unchanged.)"""
    path, run_dir, _ = experiment
    cfg = yaml.safe_load(path.read_text())
    cfg["training"]["learning_rate"] = 3e-3
    cfg["training"]["placebo"] = False
    changed = path.with_name("experiment-lr.yaml")
    changed.write_text(yaml.safe_dump(cfg))
    before = json.loads((run_dir / "stages.json").read_text())
    res = tomtransfer("run", "--config", changed)
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads((run_dir / "stages.json").read_text())
    assert "[generate] reused" in res.stderr and after["generate"]["key"] == before["generate"]["key"]
    # the teacher's dataset reused: the app is deployed once, after training, for the fine-tuned student's rows
    assert "steps aside" not in res.stderr and "deploying the serving app again" not in res.stderr
    assert res.stderr.count("[serve] deploying the serving app") == 1
    assert res.stderr.index("[train] LoRA") < res.stderr.index("[serve] deploying the serving app")
    assert "[train] inputs key" in res.stderr and after["train"]["key"] != before["train"]["key"]
    assert after["train"]["adapter_dir"] != before["train"]["adapter_dir"]
    assert after["train_placebo"] == before["train_placebo"]  # not run, not touched
    assert "[train_placebo]" not in res.stderr and "placebo set" not in res.stderr
    for role in ("teacher", "student_base", "teacher_lead"):
        assert f"[evaluate] {role}: 0 new row(s)" in res.stderr, res.stderr[-3000:]
    assert "[evaluate] student_finetuned: 0 new" not in res.stderr
    assert after["evaluate"]["key"] != before["evaluate"]["key"]
    assert "student_placebo" not in after["evaluate"]["stores"]
    stores = {p.name.split("-")[0] for p in (run_dir / "evaluate").iterdir() if p.is_dir() and "-" in p.name}
    assert "student_finetuned" in stores
    assert len([p for p in (run_dir / "evaluate").glob("student_finetuned-*")]) == 2  # old and new adapter


@pytest.mark.parametrize("case", ["latin-1 config", "unknown alias", "unset token variable"])
def test_bad_input_leaves_everything_as_it_was(tmp_path, monkeypatch, case):
    """Caught before anything is written: one line, exit 2, the folder (and the output_dir inside it) untouched."""
    out = tmp_path / "out"
    base = f"output_dir: {out}\nmodels: {{teacher: {{model: smollm2-135m-instruct}}, student: {{model: smollm2-135m-instruct}}}}\n"
    commands = ("run", "evaluate", "train", "generate", "serve")
    if case == "latin-1 config":
        data, message = ("name: d\u00e9mo\n" + base).encode("latin-1"), "not UTF-8"
    elif case == "unknown alias":
        data = base.replace("teacher: {model: smollm2-135m-instruct}", "teacher: {model: no-such-model}").encode()
        data, message, commands = data, "models.teacher.model: unknown model 'no-such-model'", ("run", "evaluate", "serve")
    else:
        monkeypatch.delenv("TT_TEST_TOKEN_UNSET", raising=False)
        data = (base + "serving: {auth_token_env: TT_TEST_TOKEN_UNSET}\n").encode()
        message, commands = "TT_TEST_TOKEN_UNSET is not set", ("run", "evaluate", "generate", "serve")
    f = tmp_path / "bad.yaml"
    f.write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    for cmd in commands:
        res = cli(cmd, "--config", f, timeout=300)
        assert res.returncode == 2, (cmd, res.stderr[-2000:])
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, (cmd, res.stderr[-2000:])
        assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists(), cmd
