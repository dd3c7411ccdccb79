"""Checks that run before a stage writes anything: a bad input gives one line and exit 2, and leaves the output
folder, the MLflow store and the cluster exactly as they were.

What is checked (each stage asks for what it needs):
  models    every locally served model resolves, an `openai` model's key variable is set
            (`services.common.checks.check_models`)
  secrets   `serving.auth_token_env` names a variable that is set (`services.common.checks.check_secrets`)
  packs     scenario packs exist, are UTF-8 and valid, and the selected scenarios exist
  objective `training.objective` distribution / sft+distribution: a given soft-label set reads and is not empty, and
            every action string (C, D, the PGG's amounts) tokenizes to something distinct with the student's tokenizer
"""

from __future__ import annotations

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError

from tomtransfer.services.collector.jobs import select_scenarios
from tomtransfer.services.common.checks import check_models, check_secrets
from tomtransfer.services.common.models import resolve_model
from tomtransfer.services.pipeline.resources import say
from tomtransfer.services.trainer.softlabels import actions_for, read_soft_labels

def check_scenarios(cfg: ExperimentConfig) -> None:
    for families in (cfg.generate.families, cfg.evaluate.families):
        select_scenarios(cfg, list(families))


def check_objective(cfg: ExperimentConfig) -> None:
    """The distribution objective can be trained: its soft-label set (when given) and its actions (see above)."""
    if cfg.training.objective == "sft":
        return
    action_sets = {tuple(actions_for(s)) for s in select_scenarios(cfg, list(cfg.generate.families))}
    if cfg.training.soft_labels:
        action_sets = {tuple(r["actions"]) for r in read_soft_labels(cfg.training.soft_labels)}
    spec = cfg.models.student
    if spec.engine == "openai":
        raise UserError("training.objective: the distribution objective trains a local student; models.student "
                        "is a remote (openai) model")
    # transformers and torch (distill): lazy, only a distribution objective needs them
    import transformers

    from tomtransfer.services.trainer.distill import ObjectiveError, action_token_ids

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolve_model(spec.model, progress=say)))
    except (OSError, ValueError) as err:
        raise UserError(f"models.student.model: cannot load its tokenizer: {err}") from None
    for actions in sorted(action_sets):
        try:
            action_token_ids(tokenizer, list(actions))
        except ObjectiveError as err:
            raise UserError(f"training.objective {cfg.training.objective}: {err}") from None


def check_inputs(cfg: ExperimentConfig, *, serve: bool) -> None:
    """All of the above; `serve`: this process starts the serving app (so the models must resolve here)."""
    check_secrets(cfg)
    check_scenarios(cfg)
    if serve and not cfg.serving.base_url:
        check_models(cfg)
    check_objective(cfg)
