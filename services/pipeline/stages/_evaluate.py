"""The evaluate stage: every role measured by the protocol, then metrics, figures, tables and the report
(`services.evaluator`).

Input key: `fingerprint.evaluate_key` (every store it reads, the metric settings). stages.json entry `evaluate`
(the key and the stores). MLflow: within `run`, the evaluation is logged to the experiment's parent run (the run
the sweeps and the UI's headline view read); `tomtransfer evaluate` alone opens the stage's own run
`<name>-evaluate` (`evaluate_run`). The evaluator logs into the active run either way.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from tomtransfer.shared.config import ExperimentConfig

from tomtransfer.services.common.console import say
from tomtransfer.services.evaluator.collect import collect, evaluate_dir, store_dirs
from tomtransfer.services.evaluator.tracking import evaluate_and_log, use_experiment
from tomtransfer.services.pipeline.fingerprint import evaluate_key
from tomtransfer.services.pipeline.stages._common import Context, Evaluated, StageLog, stage_run


def evaluate(cfg: ExperimentConfig, ctx: Context, adapter: dict | None = None, *,
             placebo_adapter: dict | None = None, run_info: dict | None = None) -> Evaluated:
    """Collect every role by the protocol (sampled, exact, or the teacher's dataset; the teacher's leading-answer
    mass under `evaluate.teacher_lead`), then metrics, figures, tables and the report under `<run_dir>/evaluate`,
    logged to the active MLflow run. `adapter` / `placebo_adapter`: the fine-tuned / placebo student's identity,
    part of that role's store key (a retrained adapter is measured afresh, the other roles reused). The stage's
    inputs key (`fingerprint.evaluate_key`: every store it reads, the metric settings) goes to stages.json."""
    say(f"[evaluate] {cfg.protocol_line()}")
    adapters = {"student_finetuned": adapter, "student_placebo": placebo_adapter}
    key = evaluate_key(cfg, adapters)
    log = StageLog(cfg.run_dir)
    changed = (log.data.get("evaluate") or {}).get("key") not in (None, key)
    say(f"[evaluate] inputs key {key}" + (" (the inputs changed since the last run)" if changed else ""))
    t0 = time.perf_counter()
    got = collect(cfg, base_url=ctx.url, adapter=adapter, placebo_adapter=placebo_adapter, progress=ctx.progress)
    for line in got.store_lines:
        say(f"[evaluate] {line}")
    if got.dataset_scenarios:
        say(f"[evaluate] teacher reference: its generated dataset on {len(got.dataset_scenarios)} scenario(s)")
    t1 = time.perf_counter()
    say(f"[evaluate] collected in {t1 - t0:.0f} s; metrics, figures, report and MLflow logging next")
    result, outputs = evaluate_and_log(out_dir=evaluate_dir(cfg), config=cfg, run_info=run_info,
                                       samples=got.samples, exact=got.exact)
    say(f"[evaluate] metrics, figures, report and MLflow logging took {time.perf_counter() - t1:.0f} s")
    log.mark("evaluate", {"key": key, "stores": {u: d.parent.name for u, d in store_dirs(cfg, adapters).items()}})
    return Evaluated(result=result, outputs=outputs, store_lines=list(got.store_lines))


def evaluate_done(cfg: ExperimentConfig, adapters: dict[str, dict | None]) -> bool:
    """Whether the last evaluation had these inputs (`adapters`: role -> adapter identity) and its stores are still
    there: then every row it needs is in them and `evaluate` calls no model."""
    rec = StageLog(cfg.run_dir).data.get("evaluate") or {}
    return (rec.get("key") == evaluate_key(cfg, adapters) and
            all(d.is_dir() for d in store_dirs(cfg, adapters).values()))


@contextmanager
def evaluate_run(cfg: ExperimentConfig, ctx: Context) -> Iterator[str]:
    """`tomtransfer evaluate` alone: the stage's own MLflow run `<name>-evaluate` (tag stage evaluate; created by
    `common.stage_run`), active while the block runs (the evaluator logs into the active run), ended FINISHED, or
    FAILED on an error. Yields its id."""
    import mlflow

    mlflow.set_tracking_uri(ctx.tracking_uri)
    use_experiment(cfg.mlflow.experiment)  # marked as model training: the UI opens on the runs table
    run_id, _ = stage_run(cfg, ctx, f"{cfg.name}-evaluate", {"tomtransfer.stage": "evaluate"})
    with mlflow.start_run(run_id=run_id):
        yield run_id
