"""The stages of an experiment: each one typed function of (validated config, context) returning its outcome.

  generate(cfg, ctx)                 -> Generated   the teacher dataset (services.collector.generate)
  generate_done / train_done / evaluate_done        whether the stage would reuse earlier work (no model needed)
  train(cfg, ctx, dataset)           -> Trained     LoRA on the student with Ray Train (services.trainer.train)
  train_placebo(cfg, ctx, dataset)   -> Trained     `training.placebo`: the same recipe on the placebo set (the
                                                    completions permuted across scenarios), `<adapter>-placebo`
  soft_label_set(cfg, ctx)           -> Path        `training.objective` distribution / sft+distribution: the
                                                    teacher's choice distributions (exact mode + its samples), the
                                                    train stage's second input
  serve_adapter(cfg, ctx, dir[, name]) -> dict      an adapter registered on the running app (multi-LoRA)
  evaluate(cfg, ctx, adapter, placebo_adapter=...) -> Evaluated   the roles measured, metrics, figures, report

One module per stage (`_generate`, `_train`, `_serve_adapter`, `_evaluate`), each owning its inputs key, its MLflow run,
its `stages.json` record and its checks; what they share (Context, the outcome types, StageLog, `stage_run`: the
one place a stage's MLflow run is created) is in `_common`. The services below (collector, trainer, evaluator,
teacher) are libraries that never import this package.

Each stage's outputs live in a folder keyed by the hash of exactly its inputs (`fingerprint`); `stages.json` in the
run folder records each stage's last outcome with its key, so a stage is reused only when its key is unchanged and
its outputs still exist, and recomputed (or resumed, when it was interrupted with the same inputs) otherwise.

The names below are the package's public surface.
"""

from tomtransfer.services.pipeline.stages._common import (Context, Evaluated, Generated, StageLog, Trained,
                                                         close_stage_run, log_parent_metrics, stage_run)
from tomtransfer.services.pipeline.stages._generate import generate, generate_done
from tomtransfer.services.pipeline.stages._train import (placebo_config, placebo_set, placebo_soft_label_set,
                                                        soft_label_dir, soft_label_set, soft_labels_ready,
                                                        teacher_cost, train, train_dir, train_done, train_placebo,
                                                        train_run, trained_adapter, training_set)
from tomtransfer.services.pipeline.stages._serve_adapter import adapter_identity, serve_adapter
from tomtransfer.services.pipeline.stages._evaluate import evaluate, evaluate_done, evaluate_run

__all__ = [
    "Context", "Evaluated", "Generated", "StageLog", "Trained", "adapter_identity", "close_stage_run", "evaluate",
    "evaluate_done", "evaluate_run", "generate", "generate_done", "log_parent_metrics", "placebo_config",
    "placebo_set", "placebo_soft_label_set", "serve_adapter", "soft_label_dir", "soft_label_set", "soft_labels_ready",
    "stage_run", "teacher_cost", "train", "train_dir", "train_done", "train_placebo", "train_run", "trained_adapter",
    "training_set",
]
