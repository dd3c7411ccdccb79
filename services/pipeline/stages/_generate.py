"""The generate stage: the teacher dataset (`services.collector.generate`).

Input key: the generate folder's name (`services.collector.generate.generate_dir`: the teacher's weights and
serving, sampling, the generate section, the scenarios). stages.json entry `generate`. MLflow: one run
`<name>-generate` per run of the stage (tags: stage generate, the experiment, the sample run id; filed under the
parent run), created here after the samples are in; the collector logs its params, metrics, dataset and samples
into it (`log_generate_to_mlflow`). The checks before it: `services.pipeline.preflight` and the endpoint check
(`services.common.checks.check_endpoint`), which the workflows in `services.pipeline.run` call.
"""

from __future__ import annotations

from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig

from tomtransfer.services.collector.generate import (GenerateResult, generate as sample_teacher, generate_dir,
                                                     log_generate_to_mlflow)
from tomtransfer.services.pipeline.stages._common import Context, Generated, StageLog, close_stage_run, stage_run


def generate(cfg: ExperimentConfig, ctx: Context) -> Generated:
    """The teacher dataset: exactly N samples per scenario (resumable), the training set and its exports."""
    key = generate_dir(cfg).name
    log = StageLog(cfg.run_dir)
    if done := log.lookup("generate", key, Generated, lambda o: Path(o.dataset).is_file(),
                          lambda o: f"{o.examples} examples made"):
        return done
    g = sample_teacher(cfg, base_url=ctx.url, progress=ctx.progress)
    ex = g.dataset
    r = g.report
    out = Generated(key=key, dataset=str(ex.parquet), examples=ex.examples, samples=ex.samples, invalid=ex.invalid,
                    samples_path=str(g.samples_path), written=r.written, already=r.already, retries=r.retries,
                    elapsed_s=r.elapsed_s, content_hash=ex.content_hash, mlflow_run_id=track(cfg, ctx, g))
    log.mark("generate", out)
    return out


def generate_done(cfg: ExperimentConfig) -> bool:
    """Whether `generate` would reuse the dataset made earlier with the same inputs (no teacher needed)."""
    rec = StageLog(cfg.run_dir).data.get("generate") or {}
    return rec.get("key") == generate_dir(cfg).name and Path(rec.get("dataset", "")).is_file()


def track(cfg: ExperimentConfig, ctx: Context, g: GenerateResult) -> str | None:
    """The stage's MLflow run for the samples and training set `g` (None without `ctx.tracking_uri`): created,
    filled by the collector, closed (FAILED when the logging fails)."""
    run_id, _ = stage_run(cfg, ctx, f"{cfg.name}-generate", {"tomtransfer.stage": "generate",
                                                              "tomtransfer.experiment": cfg.name,
                                                              "tomtransfer.run_id": g.run_id})
    if run_id is None:
        return None
    try:
        log_generate_to_mlflow(cfg, g, run_id=run_id, tracking_uri=ctx.tracking_uri)
    except BaseException:
        close_stage_run(ctx, run_id, "FAILED")
        raise
    close_stage_run(ctx, run_id)
    return run_id
