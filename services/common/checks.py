"""Checks of a config that every entry point runs before it writes or starts anything: a bad input gives one line
(`shared.errors.UserError`, exit 2) and leaves outputs, the MLflow store and the cluster as they were.

  models    every locally served model resolves: an alias of the offline store (fetched into the cache if it is
            not there yet - the cache is not an output), a Hugging Face folder, or a hub id already in the local
            cache; an `openai`-engine model's API-key variable is set
  secrets   `serving.auth_token_env` names a variable that is set

The pipeline adds the checks that span stages before it runs them (packs and scenarios, the training objective).
"""

from __future__ import annotations

import os
import sys

from shared.config import ExperimentConfig
from shared.errors import UserError

from services.common.models import resolve_model


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_models(cfg: ExperimentConfig, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    for role in roles:
        spec = getattr(cfg.models, role)
        if spec.engine == "openai":
            if spec.api_key_env and not os.environ.get(spec.api_key_env):
                raise UserError(f"models.{role}.api_key_env: environment variable {spec.api_key_env} is not set")
            continue
        try:
            resolve_model(spec.model, progress=_say)
        except UserError as e:
            raise UserError(f"models.{role}.model: {e}") from None


def check_secrets(cfg: ExperimentConfig) -> None:
    env = cfg.serving.auth_token_env
    if env and not os.environ.get(env):
        raise UserError(f"serving.auth_token_env: environment variable {env} is not set")
