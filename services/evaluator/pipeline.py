"""The whole experiment in one command: `tomtransfer run --config FILE` (and `make run` on the demo).

Steps, in order. Each stage's outputs live in a folder keyed by the hash of exactly its inputs
(`services.pipeline.fingerprint`): a rerun reuses a stage only when its inputs are unchanged, resumes one that
was interrupted with the same inputs, and recomputes one whose inputs changed - never reporting results made
from other inputs.
  1. tracking   use `mlflow.tracking_uri`, or start a local MLflow server (sqlite + artifacts under
                `<output_dir>/mlflow`, 127.0.0.1) for the duration of the run.
  2. serving    use `serving.base_url`, or start Ray + the serving app (teacher and student).
  3. run        one MLflow parent run per experiment (its id is kept in `<run_dir>/mlflow_run_id`).
  4. generate   the teacher dataset (child run `generate`): exactly N samples per scenario, training set
                (`<run_dir>/generate/<key>/`).
  5. train      LoRA on the student with Ray Train (child run `train`), adapter logged in PEFT format
                (`<run_dir>/train/<key>/`, keyed by the training set's content, the student and the settings).
  6. adapter    registered on the running app as `student:<training.adapter_name>`.
  7. evaluate   teacher, base student and fine-tuned student on every selected family (sampled or exact);
                one store per role keyed by its inputs (`<run_dir>/evaluate/<role>-<key>/`; the fine-tuned
                student's key holds the adapter's content); metrics, figures, tables and the report go to the
                parent run (and `<run_dir>/evaluate`).
  8. summary    a table on the console and how to open the MLflow UI.
Limits: one experiment at a time per output folder; the local MLflow server and Ray stop when the run
ends (reopen the store with `make mlflow-ui`). Sweeps (`sweep()`) run cells one after another.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from shared.config import ExperimentConfig, load_config
from shared.errors import UserError


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PipelineResult:
    config: ExperimentConfig
    tracking_uri: str
    mlflow_run_id: str
    adapter_uri: str | None = None
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- resources
@contextmanager
def tracking(cfg: ExperimentConfig) -> Iterator[str]:
    """The configured tracking URI, or a local MLflow server for the duration of the block."""
    if cfg.mlflow.tracking_uri:
        yield cfg.mlflow.tracking_uri
        return
    from services.common.mlflow_server import MlflowServer

    root = Path(cfg.output_dir) / "mlflow"
    _say(f"[tracking] starting a local MLflow server (store {root})")
    with MlflowServer(root) as server:
        yield server.uri


@contextmanager
def serving(config_path: Path, cfg: ExperimentConfig) -> Iterator[str]:
    """The configured app (`serving.base_url`) or a local Ray + Serve app for the duration of the block."""
    if cfg.serving.base_url:
        yield cfg.serving.base_url
        return
    import ray
    from ray import serve

    from services.teacher.serve_cli import start

    _say("[serve] starting Ray and the serving app (teacher + student)")
    try:
        url = start(config_path)
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def effective_config(cfg: ExperimentConfig, tracking_uri: str) -> ExperimentConfig:
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": tracking_uri})})


def write_config(cfg: ExperimentConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------- stages state
class Stages:
    """`<run_dir>/stages.json`: which stages finished, with what outputs (written atomically)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.data: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, name: str) -> dict | None:
        return self.data.get(name)

    def mark(self, name: str, **outputs) -> None:
        self.data[name] = {**outputs, "finished_at": time.time()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def _parent_run(cfg: ExperimentConfig, tracking_uri: str, run_dir: Path, tags: dict | None = None):
    """Start (or resume) the experiment's MLflow run; returns the active run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    id_file = run_dir / "mlflow_run_id"
    if id_file.is_file():
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.start_run(run_id=id_file.read_text().strip())
        except MlflowException:
            pass  # the store was reset: start afresh
    run = mlflow.start_run(run_name=cfg.name, tags={"tomtransfer.stage": "run", **(tags or {})})
    id_file.write_text(run.info.run_id + "\n")
    return run


# ------------------------------------------------------------------------------------- the stages
def stage_generate(cfg: ExperimentConfig, url: str, stages: Stages) -> dict:
    """Reused only when an earlier run finished it with the same inputs (its folder is keyed by them)."""
    from services.teacher.generate import generate, generate_dir

    key = generate_dir(cfg).name
    if (done := stages.done("generate")) and done.get("key") == key and Path(done["dataset"]).is_file():
        _say(f"[generate] reused: {done['examples']} examples made earlier with the same inputs (key {key})")
        return done
    _say(f"[generate] inputs key {key}" + (" (the inputs changed since the last run)" if done else ""))
    g = generate(cfg, base_url=url)
    ex = g.dataset
    out = {"key": key, "dataset": str(ex.parquet), "examples": ex.examples, "samples": ex.samples,
           "invalid": ex.invalid, "mlflow_run_id": g.mlflow_run_id}
    stages.mark("generate", **out)
    return out


def stage_train(cfg: ExperimentConfig, tracking_uri: str, dataset: str, stages: Stages, parent_id: str) -> dict:
    """Reused only when an earlier run finished it with the same training set, student and settings."""
    from mlflow.tracking import MlflowClient

    from services.trainer.train import run_training, train_dir

    out_dir = train_dir(cfg, dataset)
    key = out_dir.name
    if (done := stages.done("train")) and done.get("key") == key and Path(done["adapter_dir"]).is_dir():
        _say(f"[train] reused: adapter {done['adapter_uri']} trained earlier with the same inputs (key {key})")
        return done
    _say(f"[train] inputs key {key}" + (" (the inputs changed since the last run)" if done else ""))
    client = MlflowClient(tracking_uri)
    id_file = out_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if run_id is None:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        run_id = client.create_run(exp.experiment_id, run_name=f"{cfg.name}-train",
                                   tags={"mlflow.parentRunId": parent_id, "tomtransfer.stage": "train"}).info.run_id
    _say(f"[train] LoRA on {cfg.models.student.model}: {cfg.training.num_workers} Ray Train worker(s)")
    res = run_training(cfg, dataset, cfg.models.student.model, tracking_uri, run_id=run_id)
    out = {"key": key} | {k: res.get(k) for k in ("run_id", "adapter_dir", "adapter_uri", "train_loss", "loss", "tokens_per_s",
                                   "steps", "wall_s")}
    stages.mark("train", **out)
    return out


def register_adapter(url: str, name: str, source: str, api_key: str | None = None) -> None:
    import httpx

    root = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{root}/adapters", json={"name": name, "source": source, "replace": True}, headers=headers,
                   timeout=600)
    if r.status_code >= 400:
        raise UserError(f"the serving app refused adapter {name} ({source}): {r.status_code} {r.text[:200]}")


def stage_evaluate(cfg: ExperimentConfig, url: str, config_path: Path | None, run_info: dict | None = None,
                   adapter: dict | None = None):
    """Collect (per role: sampled, exact or the teacher's dataset) and compute + write + log (to the active run)
    the evaluation. `adapter`: the fine-tuned student's adapter identity (its content hash), part of that role's
    store key, so a retrained adapter is measured afresh while the other roles' results are reused."""
    from services.evaluator.collect import collect, evaluate_dir
    from services.evaluator.tracking import evaluate_and_log

    _say(f"[evaluate] {cfg.protocol_line()}")
    got = collect(cfg, base_url=url, adapter=adapter)
    for line in got.store_lines:
        _say(f"[evaluate] {line}")
    if got.dataset_scenarios:
        _say(f"[evaluate] teacher reference: its generated dataset on {len(got.dataset_scenarios)} scenario(s)")
    return evaluate_and_log(out_dir=evaluate_dir(cfg), config=cfg, config_path=config_path,
                            run_info=run_info, samples=got.samples, exact=got.exact)


# ------------------------------------------------------------------------------------- run
def run(config_path: str | Path, *, tags: dict | None = None) -> PipelineResult:
    import mlflow

    from services.pipeline.preflight import check_inputs

    config_path = Path(config_path)
    cfg = load_config(config_path)
    check_inputs(cfg, serve=True)  # before anything is written
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with ExitStack() as stack:
        tracking_uri = stack.enter_context(tracking(cfg))
        cfg = effective_config(cfg, tracking_uri)
        eff_path = write_config(cfg, run_dir / "config.effective.yaml")
        t0 = time.perf_counter()
        url = stack.enter_context(serving(eff_path, cfg))
        timings["serve_start_s"] = time.perf_counter() - t0
        stages = Stages(run_dir)
        parent = _parent_run(cfg, tracking_uri, run_dir, tags)
        with parent:
            mlflow.log_artifact(str(config_path), "config")
            mlflow.log_params({"teacher": cfg.models.teacher.model, "student": cfg.models.student.model,
                               "teacher_engine": cfg.models.teacher.engine, "student_engine": cfg.models.student.engine,
                               "estimator": cfg.evaluate.estimator, "protocol": cfg.evaluate.protocol,
                               "rate": cfg.evaluate.rate})
            t0 = time.perf_counter()
            gen = stage_generate(cfg, url, stages)
            timings["generate_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tr = stage_train(cfg, tracking_uri, gen["dataset"], stages, parent.info.run_id)
            timings["train_s"] = time.perf_counter() - t0
            adapter = cfg.training.adapter_name
            mlflow.log_artifacts(tr["adapter_dir"], "adapter")
            mlflow.set_tags({"tomtransfer.adapter_uri": tr["adapter_uri"] or "",
                             "tomtransfer.adapter_name": adapter})
            register_adapter(url, adapter, tr["adapter_dir"], _api_key(cfg))
            t0 = time.perf_counter()
            result, outputs = stage_evaluate(cfg, url, eff_path, {"experiment": cfg.name},
                                             adapter=adapter_identity(tr["adapter_dir"]))
            timings["evaluate_s"] = time.perf_counter() - t0
            timings["total_s"] = time.perf_counter() - t_all
            mlflow.log_metrics({f"timing.{k}": v for k, v in timings.items()})
            run_id = parent.info.run_id
    return PipelineResult(config=cfg, tracking_uri=tracking_uri, mlflow_run_id=run_id, adapter_uri=tr["adapter_uri"],
                          summary={"result": result, "outputs": outputs}, timings=timings)


def _api_key(cfg: ExperimentConfig) -> str | None:
    env = cfg.serving.auth_token_env
    return os.environ.get(env) if env else None


def evaluate_only(config_path: str | Path):
    """`tomtransfer evaluate`: needs a running app (`serving.base_url`) or starts one; logs its own run."""
    import mlflow

    from services.pipeline.preflight import check_inputs

    config_path = Path(config_path)
    cfg = load_config(config_path)
    check_inputs(cfg, serve=True)  # before anything is written
    with ExitStack() as stack:
        tracking_uri = stack.enter_context(tracking(cfg))
        cfg = effective_config(cfg, tracking_uri)
        eff_path = write_config(cfg, cfg.run_dir / "config.effective.yaml")
        url = stack.enter_context(serving(eff_path, cfg))
        adapter_dir = trained_adapter_dir(cfg)
        adapter = None
        if "student_finetuned" in cfg.evaluate.roles and not cfg.serving.base_url:
            if adapter_dir is None and cfg.training.adapter_name not in cfg.serving.adapters:
                raise UserError("no adapter for student_finetuned: train first (no adapter trained with this config's "
                                "inputs) or name it in serving.adapters")
            if adapter_dir is not None:
                register_adapter(url, cfg.training.adapter_name, str(adapter_dir), _api_key(cfg))
                adapter = adapter_identity(adapter_dir)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(cfg.mlflow.experiment)
        with mlflow.start_run(run_name=f"{cfg.name}-evaluate", tags={"tomtransfer.stage": "evaluate"}) as r:
            result, outputs = stage_evaluate(cfg, url, eff_path, adapter=adapter)
            return r.info.run_id, result, outputs


def adapter_identity(adapter_dir: str | Path) -> dict:
    from services.pipeline.fingerprint import dir_sha256

    return {"sha256": dir_sha256(Path(adapter_dir))}


def trained_adapter_dir(cfg: ExperimentConfig) -> Path | None:
    """The adapter `train` made from this config's training set and settings, if it exists."""
    from services.teacher.generate import generate_dir
    from services.trainer.dataset import TRAIN_PARQUET
    from services.trainer.train import train_dir

    dataset = generate_dir(cfg) / "dataset" / TRAIN_PARQUET
    if not dataset.is_file():
        return None
    d = train_dir(cfg, dataset) / "adapter"
    return d if d.is_dir() else None


# ------------------------------------------------------------------------------------- sweep
def sweep(sweep_path: str | Path) -> list[dict]:
    """Every cell of the grid as a child run of one parent run; finished cells are skipped on rerun."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from shared.sweep import load_sweep

    from services.pipeline.preflight import check_inputs

    spec, cells = load_sweep(sweep_path)
    for cell in cells:  # every cell's inputs, before the first one writes anything
        check_inputs(cell.config, serve=True)
    root = Path(cells[0].config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = cells[0].config
    rows: list[dict] = []
    with tracking(base) as tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(base.mlflow.experiment)
        client = MlflowClient(tracking_uri)
        id_file = root / "sweep_run_id"
        parent = None
        if id_file.is_file():
            try:
                parent = client.get_run(id_file.read_text().strip())
            except Exception:  # noqa: BLE001 - a reset store: start a new parent
                parent = None
        if parent is None:
            with mlflow.start_run(run_name=spec.name, tags={"tomtransfer.stage": "sweep"}) as p:
                mlflow.log_params({f"grid.{k}": json.dumps(v) for k, v in spec.grid.items()})
                mlflow.log_param("cells", len(cells))
            parent = client.get_run(p.info.run_id)
            id_file.write_text(parent.info.run_id + "\n")
        parent_id = parent.info.run_id
        for i, cell in enumerate(cells, start=1):
            done = client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`tomtransfer.sweep_parent` = '{parent_id}' and tags.`tomtransfer.cell` = '{cell.id}'"
                              " and attributes.status = 'FINISHED'",
            )
            if done:
                _say(f"[sweep] cell {i}/{len(cells)} {cell.id}: finished earlier, skipped")
                rows.append(_cell_row(cell, done[0]))
                continue
            _say(f"[sweep] cell {i}/{len(cells)} {cell.id}: {cell.overrides}")
            cfg = effective_config(cell.config, tracking_uri)
            path = write_config(cfg, cfg.run_dir / "config.yaml")
            res = run(path, tags={"mlflow.parentRunId": parent_id, "tomtransfer.sweep_parent": parent_id,
                                  "tomtransfer.cell": cell.id})
            rows.append(_cell_row(cell, client.get_run(res.mlflow_run_id)))
        with mlflow.start_run(run_id=parent_id):
            mlflow.log_table(data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file="sweep_summary.json")
            for r in rows:
                for k, v in r.items():
                    if k.startswith("improvement_mean.") and v is not None:
                        mlflow.log_metric(f"{r['cell']}.{k}", v)
    return rows


def _cell_row(cell, run) -> dict:
    m = run.data.metrics
    row = {"cell": cell.id, **{k: json.dumps(v) if not isinstance(v, (int, float, str)) else v
                                for k, v in cell.overrides.items()}, "run_id": run.info.run_id}
    for fam in ("in_sample", "oos_context", "oos_game"):
        row[f"improvement_mean.{fam}"] = m.get(f"improvement_mean.{fam}")
    row["pgg.improvement"] = m.get("pgg.improvement")
    return row
