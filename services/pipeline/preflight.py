"""The preflight: what every command checks before it writes or starts anything. A bad input gives one line and
exit 2, and leaves the output folder, the MLflow store and the cluster exactly as they were.

`preflight(cfg, command)` is the one entry; each command asks for what it needs:
  bind      (serve; run / evaluate without serving.base_url) no open app on a non-loopback address
            (`services.common.checks.check_bind`)
  port      (the same commands, on a local Ray cluster they start) serving.port is free (`...checks.check_port`:
            Ray Serve shares a taken port silently)
  secrets   (all but train) `serving.auth_token_env` names a variable that is set (`...checks.check_secrets`)
  packs     (all but serve) scenario packs exist, are UTF-8 and valid, and the selected scenarios exist
  models    (serve; run / evaluate without serving.base_url: teacher and student; train: the student) every locally
            served model resolves, an `openai` model's key variable is set (`...checks.check_models`)
  objective (all but serve) `training.objective` distribution / sft+distribution: a given soft-label set reads and
            is not empty, and every action string (C, D, the PGG's amounts) tokenizes to something distinct with
            the student's tokenizer
  endpoint  (run / evaluate with serving.base_url) the app there answers and serves the roles the command needs
            (`...checks.check_endpoint`); `generate` checks its endpoint itself, after the preflight, because
            `--base-url` may override the config's
"""

from __future__ import annotations

from typing import Literal

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError

from tomtransfer.services.collector.jobs import select_scenarios
from tomtransfer.services.common.checks import (
    check_bind,
    check_endpoint,
    check_models,
    check_port,
    check_secrets,
    serving_api_key,
)
from tomtransfer.services.common.console import say
from tomtransfer.services.common import lean_transformers
from tomtransfer.services.common.models import resolve_model
from tomtransfer.services.trainer.softlabels import actions_for, read_soft_labels

Command = Literal["serve", "generate", "train", "evaluate", "run"]


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
    transformers = lean_transformers.load()

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


def preflight(cfg: ExperimentConfig, command: Command) -> None:
    """Every check `command` needs (see above), cheapest first; raises `UserError` on the first that fails."""
    starts_app = command == "serve" or (command in ("run", "evaluate") and not cfg.serving.base_url)
    if starts_app:
        check_bind(cfg)
        check_port(cfg)
    if command != "train":
        check_secrets(cfg)
    if command != "serve":
        check_scenarios(cfg)
    if starts_app:
        check_models(cfg)
    elif command == "train":
        check_models(cfg, roles=("student",))
    if command != "serve":
        check_objective(cfg)
    if command in ("run", "evaluate") and cfg.serving.base_url:
        students = any(r.startswith("student") for r in cfg.evaluate.roles)
        check_endpoint(cfg, cfg.serving.base_url, serving_api_key(cfg),
                       roles=("teacher", "student") if students else ("teacher",))
