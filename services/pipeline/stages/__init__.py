"""The stages of an experiment: each one typed function of (validated config, context) returning its outcome.

  generate(cfg, ctx)                 -> Generated   the teacher dataset (services.collector.generate)
  train(cfg, ctx, dataset)           -> Trained     LoRA on the student with Ray Train (services.trainer.train)
  train_placebo(cfg, ctx, dataset)   -> Trained     `training.placebo`: the same recipe on the placebo set (the
                                                    completions permuted across scenarios), `<adapter>-placebo`
  soft_label_set(cfg, ctx)           -> Path        `training.objective` distribution / sft+distribution: the
                                                    teacher's choice distributions (exact mode + its samples), the
                                                    train stage's second input
  serve_adapter(cfg, ctx, dir[, name]) -> dict      an adapter registered on the running app (multi-LoRA)
  evaluate(cfg, ctx, adapter, placebo_adapter=...) -> Evaluated   the roles measured, metrics, figures, report

One module per stage (`generate`, `train`, `serve_adapter`, `evaluate`), each owning its inputs key, its MLflow run,
its `stages.json` record and its checks; what they share (Context, the outcome types, StageLog, `stage_run`: the
one place a stage's MLflow run is created) is in `common`. The services below (collector, trainer, evaluator,
teacher) are libraries that never import this package.

Each stage's outputs live in a folder keyed by the hash of exactly its inputs (`fingerprint`); `stages.json` in the
run folder records each stage's last outcome with its key, so a stage is reused only when its key is unchanged and
its outputs still exist, and recomputed (or resumed, when it was interrupted with the same inputs) otherwise.

The stage functions re-exported here shadow their modules' names as attributes of this package
(`stages.generate` is the function); import a module's other names from the module path
(`from tomtransfer.services.pipeline.stages.train import train_run`).
"""

from tomtransfer.services.pipeline.stages.common import (Context, Evaluated, Generated, StageLog, Trained,
                                                         close_stage_run, log_parent_metrics, stage_run)
from tomtransfer.services.pipeline.stages.generate import generate
from tomtransfer.services.pipeline.stages.train import (placebo_config, placebo_set, placebo_soft_label_set,
                                                        soft_label_dir, soft_label_set, teacher_cost, train,
                                                        train_dir, train_done, train_placebo, train_run,
                                                        trained_adapter, training_set)
from tomtransfer.services.pipeline.stages.serve_adapter import adapter_identity, serve_adapter
from tomtransfer.services.pipeline.stages.evaluate import evaluate, evaluate_run

__all__ = [
    "Context", "Evaluated", "Generated", "StageLog", "Trained", "adapter_identity", "close_stage_run", "evaluate",
    "evaluate_run", "generate", "log_parent_metrics", "placebo_config", "placebo_set", "placebo_soft_label_set",
    "serve_adapter", "soft_label_dir", "soft_label_set", "stage_run", "teacher_cost", "train", "train_dir",
    "train_done", "train_placebo", "train_run", "trained_adapter", "training_set",
]
