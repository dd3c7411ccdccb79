"""The train stage: LoRA on the student (`services.trainer.train`), its inputs (the training set, the soft-label
set of a distribution objective) and its placebo control.

  training_set(cfg[, dataset])        the training set's Parquet (the generate stage's, or a given one)
  soft_label_set(cfg, ctx)            `training.objective` distribution / sft+distribution: the teacher's choice
                                      distributions (exact mode + its samples), the train stage's second input
  train(cfg, ctx, dataset)            -> Trained   LoRA with Ray Train, resumable
  train_placebo(cfg, ctx, dataset)    -> Trained   `training.placebo`: the same recipe on the placebo set (the
                                                   completions permuted across scenarios), `<adapter>-placebo`

Input key: the train folder's name (`train_dir`: `services.common.fingerprint.train_key` with the built soft-label
set's key, `fingerprint.train_soft_labels_key`). stages.json entries `train` / `train_placebo`. MLflow: the run
`<name>-train[-placebo]` (`train_run`: created here, filed under the parent run, continued by a resumed attempt with
the same inputs); the trainer logs into it. Preflight: the student's tokenizer against the training set and the
soft-label set, before anything is written (`services.trainer.train.preflight`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.samples import LEAD_PART, adapter_name

from tomtransfer.services.collector.collection import collect_into
from tomtransfer.services.collector.cost import exact_cost, metrics as cost_metrics
from tomtransfer.services.collector.generate import generate_dir, teacher_cost_metrics
from tomtransfer.services.collector.jobs import role_identity, select_scenarios
from tomtransfer.services.collector.store import ExactStore
from tomtransfer.services.common.console import say
from tomtransfer.services.common.fingerprint import SHORT, file_sha256, model_identity
from tomtransfer.services.pipeline.fingerprint import soft_labels_key, train_soft_labels_key
from tomtransfer.services.pipeline.stages._common import (Context, StageLog, Trained, close_stage_run,
                                                         log_parent_metrics, stage_run)
from tomtransfer.services.trainer.dataset import (META_JSON, TRAIN_PARQUET, DatasetError, DatasetExport, export_placebo_set,
                                      export_training_set, log_dataset_to_mlflow)
from tomtransfer.services.trainer.softlabels import (SOFT_META_JSON, SOFT_PARQUET, SoftLabelError, SoftLabelExport,
                                         build_soft_labels, export_soft_labels, log_soft_labels_to_mlflow,
                                         placebo_soft_labels, read_soft_labels, samples_frame)

# services.trainer.train (it imports torch) and mlflow are imported where they are used: `tomtransfer generate`
# and the checks before a stage need neither.


# ------------------------------------------------------------------------------------------------ train
def training_set(cfg: ExperimentConfig, dataset: str | Path | None = None) -> Path:
    """The training set's Parquet: `dataset` (a file or an export folder), else the one `generate` made for this
    config's inputs (built from its raw samples first when only those exist)."""
    if dataset is not None:
        p = Path(dataset)
        p = p / TRAIN_PARQUET if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"training set not found: {p}")
        return p
    gen = generate_dir(cfg)
    p = gen / "dataset" / TRAIN_PARQUET
    if p.is_file():
        return p
    samples = gen / "samples" / "samples.parquet"
    if samples.is_file():
        return export_training_set(samples, gen / "dataset", name=cfg.name, targets=cfg.generate.targets,
                                   valid_policy=cfg.generate.valid_policy).parquet
    raise UserError(f"training set not found: {p} (run `tomtransfer generate` first, or pass --dataset)")


def soft_label_dir(cfg: ExperimentConfig) -> Path:
    """`<run_dir>/train/soft-labels/<key>`: the soft-label set built from the teacher (`fingerprint.soft_labels_key`)."""
    return cfg.run_dir.resolve() / "train" / "soft-labels" / soft_labels_key(cfg)


def soft_label_set(cfg: ExperimentConfig, ctx: Context | None = None) -> Path | None:
    """The soft-label set of `training.objective` (None under sft): `training.soft_labels` when given (validated),
    else the one built earlier with the same inputs, else built now from the generate stage's samples and one
    exact-mode call per scenario to the teacher on its own instruction (`ctx.url` must reach the serving app).

    Each row: the teacher's P(action | valid) = exact mode's leading-answer mass + its samples that do not lead with
    an answer for the rest (`services.trainer.softlabels`). The exact rows live in `<dir>/exact/` (resumable)."""
    if cfg.training.objective == "sft":
        return None
    given = cfg.training.soft_labels
    if given:
        p = Path(given)
        p = p / SOFT_PARQUET if p.is_dir() else p
        read_soft_labels(p)  # one line and exit 2 for a missing, empty or malformed set
        return p.resolve()
    out = soft_label_dir(cfg)
    if _built(out):
        return out / SOFT_PARQUET
    if ctx is None or not ctx.url:
        raise UserError(f"no soft-label set for this config at {out}: run `tomtransfer generate` (it builds the set "
                        "when training.objective needs one) or `tomtransfer run`, or name one in training.soft_labels")
    return _build_soft_labels(cfg, ctx, out)


def soft_labels_ready(cfg: ExperimentConfig) -> bool:
    """Whether `soft_label_set` has its set without calling the teacher (given, built earlier, or not needed)."""
    out = soft_label_dir(cfg) if cfg.training.objective != "sft" and not cfg.training.soft_labels else None
    return out is None or _built(out)


def _built(out: Path) -> bool:
    """A soft-label set folder that is complete: its meta is written last."""
    return (out / SOFT_META_JSON).is_file() and (out / SOFT_PARQUET).is_file()


def _build_soft_labels(cfg: ExperimentConfig, ctx: Context, out: Path) -> Path:
    samples_path = generate_dir(cfg) / "samples" / "samples.parquet"
    if not samples_path.is_file():
        raise UserError(f"no teacher samples at {samples_path}: the soft-label set needs the generate stage first")
    scenarios = select_scenarios(cfg, list(cfg.generate.families))
    teacher_instruction = cfg.generate.instruction
    student_instruction = cfg.evaluate.instruction_for("student_finetuned")
    spec = {**role_identity(cfg, "teacher"), "weights": model_identity(cfg.models.teacher),
            "instruction": teacher_instruction, "estimator": "exact", "part": LEAD_PART,
            "temperature": cfg.sampling.temperature}
    store = ExactStore(out / "exact", part=LEAD_PART)
    say(f"[soft-labels] teacher exact mode on {len(scenarios)} scenarios ({teacher_instruction}), plus its samples "
        f"where the answer does not lead -> {out}")
    exact_path = asyncio.run(collect_into(
        store, cfg, stage="softlabels", role="teacher", spec=spec, scenarios=scenarios,
        instruction=teacher_instruction, base_url=ctx.url, concurrency=min(cfg.evaluate.concurrency, 4),
        progress=ctx.progress, description=f"soft labels: teacher exact, {len(scenarios)} scenarios")).path
    exact_rows = {r["scenario_id"]: r for r in store.read().to_pylist()}
    df, dropped = build_soft_labels(scenarios, samples_frame(samples_path), exact_rows,
                                    instruction=student_instruction, teacher_instruction=teacher_instruction)
    teacher = role_identity(cfg, "teacher")
    ex = export_soft_labels(df, out, name=f"{cfg.name}-soft-labels", instruction=student_instruction,
                            teacher=f"{teacher['model']} ({teacher['engine']}, served as {teacher['served']})",
                            teacher_instruction=teacher_instruction, dropped=dropped,
                            inputs={"key": out.name, "samples": str(samples_path), "exact": str(exact_path)})
    say(f"[soft-labels] {ex.rows} scenarios ({', '.join(f'{k} {v}' for k, v in sorted(ex.sources.items()))}), "
        f"sha256 {ex.content_hash[:12]}" + (f"; no valid answer, left out: {', '.join(dropped)}" if dropped else ""))
    if ctx.tracking_uri and ctx.parent_run_id:
        log_soft_labels_to_mlflow(ex, run_id=ctx.parent_run_id, tracking_uri=ctx.tracking_uri)
        log_parent_metrics(ctx, {k: v for k, v in teacher_cost(cfg, generate=False).items()
                           if k.startswith("teacher_cost.soft_labels.")})  # the sums: run_stages, with generate's
    return ex.parquet


def teacher_cost(cfg: ExperimentConfig, *, generate: bool = True) -> dict[str, float]:
    """What this config's stages asked of the teacher so far, from their files (`services.collector.cost`):
    `teacher_cost.generate.*` (the generate stage's samples), `teacher_cost.soft_labels.*` (the soft-label set's
    exact calls, objectives other than sft) and their sums `teacher_cost.tokens` / `teacher_cost.forward_passes`
    (a part not built yet counts 0; `generate=False` leaves the samples out)."""
    out: dict[str, float] = {}
    samples = generate_dir(cfg) / "samples" / "samples.parquet"
    if generate and samples.is_file():
        out |= teacher_cost_metrics(samples, "teacher_cost.generate")
    exact = soft_label_dir(cfg) / "exact"
    if cfg.training.objective != "sft" and not cfg.training.soft_labels and exact.is_dir():
        out |= cost_metrics(exact_cost(ExactStore(exact, part=LEAD_PART).read(["raw"]).to_pylist()),
                       "teacher_cost.soft_labels")
    for k in ("tokens", "forward_passes"):
        out[f"teacher_cost.{k}"] = sum(out.get(f"teacher_cost.{part}.{k}", 0.0)
                                       for part in ("generate", "soft_labels"))
    return out


def placebo_soft_label_set(cfg: ExperimentConfig, soft_labels: str | Path) -> Path:
    """The placebo of a soft-label set (each scenario's target moved to another scenario, seed = sampling.seed),
    written once under `<run_dir>/train/soft-labels/placebo-<source sha256>-seed<seed>/`."""
    src = Path(soft_labels)
    seed = cfg.sampling.seed
    out = cfg.run_dir.resolve() / "train" / "soft-labels" / f"placebo-{file_sha256(src)[:SHORT]}-seed{seed}"
    if _built(out):
        return out / SOFT_PARQUET
    return placebo_soft_labels(src, out, seed=seed, name=cfg.name).parquet


def placebo_set(cfg: ExperimentConfig, dataset: str | Path) -> Path:
    """The placebo training set of `dataset` (`services.trainer.dataset.export_placebo_set`: its completions
    permuted across scenarios, seed = sampling.seed), written once under
    `<run_dir>/train/placebo-sets/<source sha256>-seed<seed>/` (named by its inputs; reused when there)."""
    dataset = Path(dataset)
    seed = cfg.sampling.seed
    out = cfg.run_dir.resolve() / "train" / "placebo-sets" / f"{file_sha256(dataset)[:SHORT]}-seed{seed}"
    if (out / META_JSON).is_file() and (out / TRAIN_PARQUET).is_file():  # the meta is written last
        return out / TRAIN_PARQUET
    ex = export_placebo_set(dataset, out, seed=seed, name=cfg.name, targets=cfg.generate.targets,
                            valid_policy=cfg.generate.valid_policy)
    p = ex.placebo
    say(f"[train] placebo set (seed {seed}): {p['moved']} of {p['examples']} completions moved to another "
        f"scenario's prompt -> {out}")
    return ex.parquet


def placebo_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config the placebo adapter is trained with: the same, its adapter named `<adapter_name>-placebo`."""
    name = adapter_name("student_placebo", cfg.training.adapter_name)
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"adapter_name": name})})


def train_placebo(cfg: ExperimentConfig, ctx: Context, dataset: str | Path, *, checkpoint_every: int = 0) -> Trained:
    """`training.placebo`: the same recipe on the placebo set of `dataset`, as `<adapter_name>-placebo` (its own
    key, MLflow run `<name>-train-placebo`, stages.json entry `train_placebo`)."""
    soft = soft_label_set(cfg, ctx)
    return train(placebo_config(cfg), ctx, placebo_set(cfg, dataset), checkpoint_every=checkpoint_every, placebo=True,
                 soft_labels=placebo_soft_label_set(cfg, soft) if soft is not None else None)


def train(cfg: ExperimentConfig, ctx: Context, dataset: str | Path, *, checkpoint_every: int = 0,
          placebo: bool = False, soft_labels: str | Path | None = None) -> Trained:
    """LoRA on the student with Ray Train; resumes an interrupted run with the same inputs (the same key).
    `placebo`: `dataset` is the placebo set (`train_placebo`). `soft_labels`: the distribution objective's set
    (default: `soft_label_set`; checked against the student's tokenizer before anything is written)."""
    from tomtransfer.services.trainer.train import preflight, resolve_student, run_training

    dataset = Path(dataset)
    out_dir = train_dir(cfg, dataset, placebo=placebo)
    key = out_dir.name
    stage = "train_placebo" if placebo else "train"
    log = StageLog(cfg.run_dir)
    if done := log.lookup(stage, key, Trained, lambda o: Path(o.adapter_dir).is_dir(),
                          lambda o: f"adapter {o.adapter_dir} trained"):
        return done
    if soft_labels is None and cfg.training.objective != "sft":
        soft_labels = soft_label_set(cfg, ctx)
    if soft_labels is not None:  # an action the student cannot score, an empty set: one line, nothing written
        preflight(dataset, resolve_student(cfg.models.student.model), cfg.training.max_seq_len,
                  objective=cfg.training.objective, soft_labels_path=soft_labels)
    # the stage's MLflow run, filed under the parent; an interrupted attempt's is continued
    run_id, created = train_run(cfg, ctx, out_dir, placebo=placebo)
    if created:
        _log_train_inputs(cfg, ctx.tracking_uri, run_id, dataset, soft_labels)
    t = cfg.training
    say(f"[train] LoRA on {cfg.models.student.model}{' (placebo control)' if placebo else ''}: {t.num_workers} Ray "
        f"Train worker(s){' on GPUs' if t.use_gpu else ''}, objective {t.objective}")
    res = run_training(cfg, dataset, cfg.models.student.model, ctx.tracking_uri, run_id=run_id, out_dir=out_dir,
                       checkpoint_every_steps=checkpoint_every, placebo=placebo, soft_labels_path=soft_labels)
    out = Trained(key=key, adapter_dir=res["adapter_dir"], adapter_uri=res.get("adapter_uri"), run_id=res.get("run_id"),
                  train_loss=res.get("train_loss"), steps=res.get("steps"), tokens_per_s=res.get("tokens_per_s"),
                  wall_s=res.get("wall_s"))
    close_stage_run(ctx, run_id)
    log.mark(stage, out)
    return out


def train_run(cfg: ExperimentConfig, ctx: Context, out_dir: str | Path, *,
              placebo: bool = False) -> tuple[str | None, bool]:
    """The train stage's MLflow run (None without `ctx.tracking_uri`): the one an earlier (interrupted) attempt with
    the same inputs recorded in `<out_dir>/mlflow_run_id`, else a new run `<name>-train[-placebo]` (tags: stage
    train, placebo where it is, the parent run where `ctx` has one), recorded there (`common.stage_run`). Returns
    the id and whether the run was created now; `run_training` logs into it."""
    tags = {"tomtransfer.stage": "train"} | ({"tomtransfer.placebo": "true"} if placebo else {})
    return stage_run(cfg, ctx, f"{cfg.name}-train{'-placebo' if placebo else ''}", tags,
                     record=Path(out_dir) / "mlflow_run_id")


def _log_train_inputs(cfg: ExperimentConfig, tracking_uri: str, run_id: str, dataset: Path,
                      soft_labels: str | Path | None) -> None:
    """A new train run's inputs: the training set (and its placebo permutation), the soft-label set."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        ex = DatasetExport.from_dir(dataset.parent)
        log_dataset_to_mlflow(ex, run_id=run_id, tracking_uri=tracking_uri)
        if ex.placebo:  # the permutation, as params beside the training settings
            for k in ("seed", "moved", "examples", "source_content_sha256"):
                client.log_param(run_id, f"placebo.{k}", str(ex.placebo[k]))
    except DatasetError:
        pass  # a bare Parquet file: no card to log
    if soft_labels is not None:
        client.log_param(run_id, "training.objective", cfg.training.objective)
        try:
            log_soft_labels_to_mlflow(SoftLabelExport.from_dir(Path(soft_labels).parent), run_id=run_id,
                                      tracking_uri=tracking_uri)
        except SoftLabelError:
            pass  # a bare Parquet file: no card to log


def train_dir(cfg: ExperimentConfig, dataset: str | Path, *, placebo: bool = False) -> Path:
    """The train stage's folder (`services.trainer.train.train_dir`), its key holding the built soft-label set's
    where the objective trains on it (`fingerprint.train_soft_labels_key`)."""
    from tomtransfer.services.trainer.train import train_dir as trainer_dir

    return trainer_dir(cfg, dataset, placebo=placebo, soft_labels_key=train_soft_labels_key(cfg))


def train_done(cfg: ExperimentConfig, dataset: str | Path) -> bool:
    """Whether `train` (and `train_placebo` under `training.placebo`) would reuse adapters made earlier with the
    same inputs (nothing to make room for)."""
    data = StageLog(cfg.run_dir).data

    def done(stage: str, key: str) -> bool:
        rec = data.get(stage) or {}
        return rec.get("key") == key and Path(rec.get("adapter_dir", "")).is_dir()

    if not done("train", train_dir(cfg, Path(dataset)).name):
        return False
    return not cfg.training.placebo or done("train_placebo",
                                            train_dir(cfg, placebo_set(cfg, dataset), placebo=True).name)


def trained_adapter(cfg: ExperimentConfig, *, placebo: bool = False) -> Path | None:
    """The adapter `train` (`placebo`: `train_placebo`) made from this config's training set and settings, if it
    exists."""
    dataset = generate_dir(cfg) / "dataset" / TRAIN_PARQUET
    if not dataset.is_file():
        return None
    if placebo:
        d = train_dir(cfg, placebo_set(cfg, dataset), placebo=True) / "adapter"
    else:
        d = train_dir(cfg, dataset) / "adapter"
    return d if d.is_dir() else None
